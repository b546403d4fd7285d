"""Search an index with composed queries: one reference image + modification text, or a JSONL batch.

    python launch/search.py --index indexes/photos --image ref.jpg --text "with a red roof" [-k 20] [--sheet out.png]
    python launch/search.py --index indexes/photos --queries queries.jsonl --out results.jsonl
    python launch/search.py --index indexes/synthetic_val --benchmark synthetic --split val --out results.jsonl

The query encoder comes from the bundle the index records (`--bundle` to name it elsewhere); an index built from
another bundle is refused. A batch (`--queries`, JSONL of {"image", "text", optional "id", "target", "exclude"}, or
every labelled query of `--benchmark`) writes one result line per query and prints recall@K when targets are
known. `--sheet` draws the query and its top-k as a PNG contact sheet, the target framed green when known.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.cli import CONFIG_ERROR_EXIT, ConfigError, parse_config_args  # noqa: E402


def add_arguments(parser) -> None:
    parser.add_argument("--index", required=True, help="an index directory (launch/index.py)")
    parser.add_argument("--bundle", help="the bundle to encode queries with (default: the one the index records)")
    parser.add_argument("-k", type=int, help="results per query (default index.top_k)")
    parser.add_argument("--image", help="the reference image of one query")
    parser.add_argument("--text", help="the modification text of one query")
    parser.add_argument("--target", help="one query: the gallery id of the known answer (framed green on the sheet)")
    parser.add_argument("--sheet", help="one query: write a contact sheet PNG here")
    parser.add_argument("--queries", help="a JSONL batch of queries")
    parser.add_argument("--benchmark", help="a batch of every labelled query of a registered benchmark split")
    parser.add_argument("--split", default="val", help="with --benchmark: the split (default val)")
    parser.add_argument("--out", help="batch: the JSONL of results to write")


def _usage_problem(args) -> str | None:
    single, batch = args.image is not None or args.text is not None, args.queries or args.benchmark
    if single and batch:
        return "give either --image/--text (one query) or --queries/--benchmark (a batch), not both"
    if not single and not batch:
        return "give --image and --text (one query), or --queries or --benchmark (a batch)"
    if single and (args.image is None or args.text is None):
        return "one query needs both --image and --text"
    if args.queries and args.benchmark:
        return "give --queries or --benchmark, not both"
    if batch and not args.out:
        return "a batch needs --out results.jsonl"
    if args.k is not None and args.k < 1:
        return "-k must be >= 1"
    return None


def main(argv: list[str] | None = None) -> int:
    try:
        args, config = parse_config_args(argv, "Search an index with composed queries.", add_arguments, "tiny")
        problem = _usage_problem(args)
        if problem:
            raise ConfigError(problem)
    except ConfigError as error:
        print(f"usage error: {error}", file=sys.stderr)
        return CONFIG_ERROR_EXIT
    logging.basicConfig(level=logging.ERROR)
    from training.retrieval.bundle import BundleError, load_bundle
    from training.retrieval.index import GalleryIndex, GalleryIndexError
    from training.retrieval.retriever import UnreadableImage
    from training.retrieval.search import QueryFileError

    k = args.k or config.index.top_k
    try:
        index = GalleryIndex.open(args.index)
        bundle = args.bundle or index.bundle_dir
        if bundle is None:
            raise GalleryIndexError(f"{args.index} does not record its bundle: pass --bundle")
        retriever = load_bundle(bundle)
        index.check_bundle(retriever.bundle_hash)
        if args.image is not None:
            return _one_query(args, retriever, index, k)
        return _batch(args, config, retriever, index, k)
    except (BundleError, GalleryIndexError, QueryFileError, UnreadableImage, ValueError) as error:
        print(f"search error: {error}", file=sys.stderr)
        return CONFIG_ERROR_EXIT


def _one_query(args, retriever, index, k: int) -> int:
    from training.retrieval.sheet import contact_sheet

    hits = index.search(retriever.encode_query(args.image, args.text)[None], k)[0]
    print(f'query: {args.image} + "{args.text}"   ({len(index)} images in {args.index})')
    for hit in hits:
        marker = "  <- target" if hit.id == args.target else ""
        print(f"{hit.rank:4d}  {hit.score:7.4f}  {hit.id}{marker}")
    if args.sheet:
        print(f"contact sheet: {contact_sheet(args.image, args.text, hits, args.sheet, target=args.target)}")
    return 0


def _batch(args, config, retriever, index, k: int) -> int:
    from training.retrieval.search import (
        benchmark_queries,
        read_benchmark_split,
        read_queries,
        recall_summary,
        result_record,
        search_batch,
    )

    if args.benchmark:
        queries = benchmark_queries(read_benchmark_split(config.eval, args.benchmark, args.split))
    else:
        queries = read_queries(args.queries)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    records = []
    partial = out.with_name(f".{out.name}.partial")
    with open(partial, "w") as handle:
        for query, hits in search_batch(retriever, index, queries, k, config.index.batch_size):
            record = result_record(query, hits)
            records.append(record)
            handle.write(json.dumps(record) + "\n")
    partial.replace(out)
    print(f"{len(records)} queries searched; results: {out}")
    summary = recall_summary(records, k)
    if summary:
        print("  ".join(f"{name} {100 * value:.2f}" for name, value in summary.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
