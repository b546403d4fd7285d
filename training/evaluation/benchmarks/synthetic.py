"""The embedded synthetic benchmark: CIRR's layout (val images under dev/) plus `objects.json`.

    <root>/objects.json = {"images":   {name: {"objects": [{"id", "box": [x0, y0, x1, y1] (fractions), ...}]}},
                           "captions": {"val": {"<pairid>": [{"np": text, "object": id, "image": "reference"}]}}}

Protocol: CIRR's (recall@{1,5,10,50} with the reference removed, recall_subset@{1,2,3}, avg) plus a grounding
score over the noun phrases that name an object of the reference image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from training.evaluation.benchmarks.base import (
    Benchmark,
    BenchmarkError,
    BenchmarkSplit,
    DatasetSettings,
    GroundedPhrase,
    Protocol,
    file_digest,
    read_json,
    register_benchmark,
)
from training.evaluation.benchmarks.cirr import read_cirr_layout

SYNTHETIC_PROTOCOL = Protocol(
    recall_ks=(1, 5, 10, 50),
    subset_ks=(1, 2, 3),
    remove_reference=True,
    average=("recall@5", "recall_subset@1"),
    grounding=True,
)


def _box(raw: object, path: Path, where: str) -> tuple[float, float, float, float]:
    if not isinstance(raw, (list, tuple)) or len(raw) != 4:
        raise BenchmarkError(f"{path}: {where} box must be [x0, y0, x1, y1], got {raw!r}")
    x0, y0, x1, y1 = (float(value) for value in raw)
    if not (0.0 <= x0 <= x1 <= 1.0 and 0.0 <= y0 <= y1 <= 1.0):
        raise BenchmarkError(f"{path}: {where} box {raw!r} must hold fractions with x0 <= x1 and y0 <= y1")
    return x0, y0, x1, y1


def read_synthetic(root: str | Path, split: str = "val") -> BenchmarkSplit:
    """Read the synthetic benchmark's split with each query's grounded noun phrases.

    Raises:
        BenchmarkError: a missing file or image, or an NP whose object the reference image lacks.
    """
    root = Path(root)
    benchmark = read_cirr_layout(root, split, name="synthetic", protocol=SYNTHETIC_PROTOCOL, require_labels=True)
    objects_file = root / "objects.json"
    annotations = read_json(objects_file, "synthetic objects")
    if not isinstance(annotations, dict) or "images" not in annotations or "captions" not in annotations:
        raise BenchmarkError(f"{objects_file}: expected {{'images': ..., 'captions': ...}}")
    phrase_lists = annotations["captions"].get(split, {})
    images = annotations["images"]
    queries = []
    grounded = 0
    for query in benchmark.queries:
        phrases = []
        for position, phrase in enumerate(phrase_lists.get(query.query_id, ())):
            # Only phrases about the reference image can be grounded on it; others (e.g. an object to add) can't.
            if phrase.get("image", "reference") != "reference":
                continue
            where = f"captions.{split}.{query.query_id}[{position}]"
            objects = images.get(query.reference, {}).get("objects", [])
            match = [item for item in objects if item.get("id") == phrase.get("object")]
            if not match:
                raise BenchmarkError(
                    f"{objects_file}: {where} names object {phrase.get('object')!r}, "
                    f"which reference image {query.reference} does not list"
                )
            start = phrase.get("char_start")
            phrases.append(
                GroundedPhrase(
                    text=str(phrase["np"]),
                    box=_box(match[0].get("box"), objects_file, f"images.{query.reference}.objects"),
                    char_start=int(start) if start is not None else None,
                )
            )
        grounded += len(phrases)
        queries.append(replace(query, phrases=tuple(phrases)))
    benchmark.queries = queries
    benchmark.version.update({"objects_sha256": file_digest(objects_file), "grounded_phrases": grounded})
    return benchmark


@dataclass
class SyntheticSettings(DatasetSettings):
    """`eval.datasets.synthetic`."""

    split: str = "val"
    """The split to score."""


def _scored(settings: SyntheticSettings, splits: Sequence[str]) -> list[BenchmarkSplit]:
    del splits  # every split of the synthetic benchmark is labelled
    return [read_synthetic(settings.root, settings.split)]


register_benchmark(
    Benchmark(
        name="synthetic",
        protocol=SYNTHETIC_PROTOCOL,
        read=_scored,
        summary="the embedded synthetic benchmark (`launch/make_synthetic.py`): the CIRR protocol plus grounding, "
        "the share of each noun phrase's attention inside its object's box",
        settings=SyntheticSettings,
    )
)
