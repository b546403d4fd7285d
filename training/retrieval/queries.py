"""Searching an index with composed queries: one at a time, a JSONL batch, or every query of a benchmark split.

A batch is JSONL, one query per line:

    {"id": "q1", "image": "ref.jpg", "text": "with a red roof", "target": "house_17", "exclude": ["ref"]}

`image` and `text` are required; `id` defaults to the line number; `target` (known answer) makes the summary
report recall@K; `exclude` lists gallery ids never to return (the reference image, under CIRR's protocol). Each
result line repeats the query and adds `results` (rank, id, path, score) and `target_rank` (None when absent).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from training.retrieval.gallery_index import GalleryIndex, GalleryIndexError, GalleryItem
from training.retrieval.hit import Hit

if TYPE_CHECKING:
    from training.evaluation.benchmarks.base import BenchmarkSplit
    from training.evaluation.config import EvalConfig
    from training.retrieval.retriever import Retriever

RECALL_KS = (1, 5, 10, 50)


class QueryFileError(ValueError):
    """A malformed batch file; the message names the file and line."""


@dataclass
class SearchQuery:
    id: str
    image: str
    text: str
    target: str | None = None
    exclude: list[str] = field(default_factory=list)


def read_queries(path: str | Path) -> list[SearchQuery]:
    """Parse a JSONL batch of queries; relative image paths are relative to the file.

    Raises:
        QueryFileError: a missing file, a line that is not a JSON object, or a query without image or text.
    """
    path = Path(path)
    if not path.is_file():
        raise QueryFileError(f"query file not found: {path}")
    queries = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as error:
            raise QueryFileError(f"{path}:{number}: not JSON: {error}") from error
        if (
            not isinstance(record, dict)
            or not isinstance(record.get("image"), str)
            or not isinstance(record.get("text"), str)
        ):
            raise QueryFileError(f"{path}:{number}: each line needs string fields 'image' and 'text'")
        image = Path(record["image"])
        exclude = record.get("exclude", [])
        if not isinstance(exclude, list):
            raise QueryFileError(f"{path}:{number}: 'exclude' must be a list of gallery ids")
        queries.append(
            SearchQuery(
                id=str(record.get("id", number)),
                image=str(image if image.is_absolute() else path.parent / image),
                text=record["text"],
                target=None if record.get("target") is None else str(record["target"]),
                exclude=[str(value) for value in exclude],
            )
        )
    return queries


def open_search(index_dir: str | Path, bundle: str | Path | None = None) -> tuple[GalleryIndex, Retriever]:
    """An index and the query encoder of its bundle (the one it records, unless `bundle` names another).

    Raises:
        GalleryIndexError: an unfinished or damaged index, no bundle known, or a bundle other than the index's.
        training.retrieval.bundle.BundleError: a missing or damaged bundle.
    """
    from training.retrieval.bundle import load_bundle

    index = GalleryIndex.open(index_dir)
    bundle = bundle or index.bundle_dir
    if bundle is None:
        raise GalleryIndexError(f"{index_dir} does not record its bundle: pass --bundle")
    retriever = load_bundle(bundle)
    index.check_bundle(retriever.bundle_hash)
    return index, retriever


def search_batch(
    retriever: Retriever, index: GalleryIndex, queries: Sequence[SearchQuery], k: int, batch_size: int = 64
) -> Iterator[tuple[SearchQuery, list[Hit]]]:
    """Encode queries in batches and yield each with its top-k hits, in order (with a progress bar)."""
    index.check_bundle(retriever.bundle_hash)
    with tqdm(total=len(queries), desc="searching", unit="query", dynamic_ncols=True) as progress:
        for start in range(0, len(queries), batch_size):
            batch = queries[start : start + batch_size]
            embeddings = retriever.encode_queries([query.image for query in batch], [query.text for query in batch])
            yield from zip(batch, index.search(embeddings, k, [query.exclude for query in batch]))
            progress.update(len(batch))


def search_to_file(
    retriever: Retriever,
    index: GalleryIndex,
    queries: Sequence[SearchQuery],
    k: int,
    out: str | Path,
    batch_size: int = 64,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Search a batch into a JSONL file; returns the records and their recall@K (empty without targets)."""
    found = search_batch(retriever, index, queries, k, batch_size)
    records = write_results((result_record(query, hits) for query, hits in found), out)
    return records, recall_summary(records, k)


def format_hits(hits: Sequence[Hit], target: str | None, k: int) -> str:
    """The console listing of one query's hits: rank, score, id, the target marked."""
    lines = [f"{hit.rank:4d}  {hit.score:7.4f}  {hit.id}{'  <- target' if hit.id == target else ''}" for hit in hits]
    if target is not None and all(hit.id != target for hit in hits):
        lines.append(f"target {target} is not in the top {k}")
    return "\n".join(lines)


def write_results(records: Iterator[dict[str, Any]], out: str | Path) -> list[dict[str, Any]]:
    """Write result records as JSONL, renamed into place when complete; returns them."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    written = []
    with open(partial, "w") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
            written.append(record)
    partial.replace(out)
    return written


def result_record(query: SearchQuery, hits: Sequence[Hit]) -> dict[str, Any]:
    """One output line of a batch search."""
    target_rank = next((hit.rank for hit in hits if hit.id == query.target), None)
    return {
        "id": query.id,
        "image": query.image,
        "text": query.text,
        "target": query.target,
        "target_rank": target_rank,
        "results": [hit.to_json() for hit in hits],
    }


def recall_summary(records: Sequence[dict[str, Any]], k: int) -> dict[str, float]:
    """recall@K over the records with a target, for each K of RECALL_KS within the searched depth `k`."""
    scored = [record for record in records if record["target"] is not None]
    if not scored:
        return {}
    summary = {}
    for cutoff in (value for value in RECALL_KS if value <= k):
        hits = sum(1 for record in scored if record["target_rank"] is not None and record["target_rank"] <= cutoff)
        summary[f"recall@{cutoff}"] = hits / len(scored)
    return summary


# --- benchmarks as galleries and query batches ---------------------------------------------------------------------


def read_benchmark_split(eval_config: EvalConfig, name: str, split: str) -> BenchmarkSplit:
    """One split of a registered benchmark, from its `eval.datasets.<name>` settings.

    Raises:
        ValueError: an unknown benchmark, no root configured, or a benchmark of several parts (FashionIQ).
    """
    from training.evaluation.benchmarks import BENCHMARKS

    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; registered: {', '.join(BENCHMARKS.names())}")
    settings = eval_config.dataset(name)
    if not settings.root:
        raise ValueError(f"eval.datasets.{name}.root is not set: say where the benchmark's files are")
    parts = BENCHMARKS.get(name).scored_splits(settings, [split])
    if len(parts) != 1:
        raise ValueError(f"{name} has {len(parts)} parts ({', '.join(part.name for part in parts)}); index one folder")
    return parts[0]


def benchmark_gallery(split: BenchmarkSplit) -> list[GalleryItem]:
    """The split's gallery as index items: the benchmark's image names as ids."""
    return [GalleryItem(name, str(split.image_paths[name])) for name in split.gallery]


def benchmark_query(split: BenchmarkSplit, query_id: str) -> SearchQuery:
    """One labelled query of the split by its id; a ValueError names a few valid ids."""
    queries = benchmark_queries(split)
    chosen = next((query for query in queries if query.id == query_id), None)
    if chosen is None:
        known = ", ".join(query.id for query in queries[:5])
        raise ValueError(f"{split.name} {split.split} has no query {query_id!r} (ids: {known}, ...)")
    return chosen


def benchmark_queries(split: BenchmarkSplit) -> list[SearchQuery]:
    """The split's labelled queries, with the reference excluded when its protocol removes it (CIRR's)."""
    return [
        SearchQuery(
            id=query.query_id,
            image=str(split.image_paths[query.reference]),
            text=query.text,
            target=query.target,
            exclude=[query.reference] if split.protocol.remove_reference else [],
        )
        for query in split.queries
    ]
