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

from training.retrieval.hit import Hit
from training.retrieval.index import GalleryIndex, GalleryItem

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
