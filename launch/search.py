"""Search an index with composed queries: one reference image + modification text, or a JSONL batch.

    python launch/search.py --index indexes/photos --image ref.jpg --text "with a red roof" [-k 20] [--sheet out.png]
    python launch/search.py --index indexes/photos --queries queries.jsonl --out results.jsonl
    python launch/search.py --index indexes/synthetic_val --benchmark synthetic --split val --out results.jsonl
    python launch/search.py --index indexes/synthetic_val --benchmark synthetic --query 0 --sheet search.png

The query encoder comes from the bundle the index records (`--bundle` to name it elsewhere); an index built from
another bundle is refused. A batch (`--queries`, JSONL of {"image", "text", optional "id", "target", "exclude"}, or
every labelled query of `--benchmark`) writes one result line per query and prints recall@K when targets are
known. `--sheet` draws the query and its top-k as a PNG contact sheet, the target framed green when known.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.cli import CONFIG_ERROR_EXIT, ConfigError, parse_config_args  # noqa: E402


def add_arguments(parser) -> None:
    parser.add_argument("--index", required=True, help="an index directory (launch/index.py)")
    parser.add_argument("--bundle", help="the bundle to encode queries with (default: the one the index records)")
    parser.add_argument("-k", type=int, help="results per query (default index.top_k)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", help="one query: the reference image (with --text)")
    source.add_argument("--queries", help="a JSONL batch of queries (with --out)")
    source.add_argument("--benchmark", help="every labelled query of a registered benchmark split (or --query ID)")
    parser.add_argument("--text", help="one query: the modification text")
    parser.add_argument("--target", help="one query: the gallery id of the known answer (framed green on the sheet)")
    parser.add_argument("--sheet", help="one query: write a contact sheet PNG here")
    parser.add_argument("--split", default="val", help="with --benchmark: the split (default val)")
    parser.add_argument("--query", help="with --benchmark: search only this query id, as one query (--sheet works)")
    parser.add_argument("--out", help="batch: the JSONL of results to write")


def _usage_problem(args) -> str | None:
    single = args.image is not None or args.query is not None
    if (args.image is None) != (args.text is None):
        return "one query needs both --image and --text"
    if args.query is not None and not args.benchmark:
        return "--query picks a query of --benchmark"
    if not single and (args.sheet or not args.out):
        return "a batch writes --out results.jsonl; --sheet draws one query (--image/--text, or --query)"
    return "-k must be >= 1" if args.k is not None and args.k < 1 else None


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
    from training.retrieval.bundle import BundleError
    from training.retrieval.gallery_index import GalleryIndexError
    from training.retrieval.queries import QueryFileError, open_search
    from training.retrieval.retriever import UnreadableImage

    k = args.k or config.index.top_k
    try:
        index, retriever = open_search(args.index, args.bundle)
        if args.query is not None:
            from training.retrieval.queries import benchmark_query, read_benchmark_split

            chosen = benchmark_query(read_benchmark_split(config.eval, args.benchmark, args.split), args.query)
            return _one_query(args, retriever, index, k, chosen.image, chosen.text, chosen.target, chosen.exclude)
        if args.image is not None:
            return _one_query(args, retriever, index, k, args.image, args.text, args.target)
        return _batch(args, config, retriever, index, k)
    except (BundleError, GalleryIndexError, QueryFileError, UnreadableImage, ValueError) as error:
        print(f"search error: {error}", file=sys.stderr)
        return CONFIG_ERROR_EXIT


def _one_query(args, retriever, index, k: int, image: str, text: str, target: str | None, exclude=None) -> int:
    from training.retrieval.queries import format_hits
    from training.retrieval.sheet import contact_sheet

    hits = index.search(retriever.encode_query(image, text)[None], k, [exclude or []])[0]
    print(f'query: {image} + "{text}"   ({len(index)} images in {args.index})')
    print(format_hits(hits, target, k))
    if args.sheet:
        print(f"contact sheet: {contact_sheet(image, text, hits, args.sheet, target=target)}")
    return 0


def _batch(args, config, retriever, index, k: int) -> int:
    from training.retrieval.queries import benchmark_queries, read_benchmark_split, read_queries, search_to_file

    if args.benchmark:
        queries = benchmark_queries(read_benchmark_split(config.eval, args.benchmark, args.split))
    else:
        queries = read_queries(args.queries)
    records, summary = search_to_file(retriever, index, queries, k, args.out, config.index.batch_size)
    print(f"{len(records)} queries searched; results: {args.out}")
    if summary:
        print("  ".join(f"{name} {100 * value:.2f}" for name, value in summary.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
