"""The embedded synthetic benchmark: CIRR's layout (val images under dev/) plus `objects.json`.

    <root>/objects.json = {"images":   {name: {"objects": [{"id", "box": [x0, y0, x1, y1] (fractions), ...}]}},
                           "captions": {"val": {"<pairid>": [{"np": text, "char_start": int, "kind": str,
                                                              "object": id | null, "box": [...] | null,
                                                              "image": "reference"}]}}}

Every caption NP is listed with what it names (`kind`): `present` (an object of the reference image, grounded on
that object's box), `added` (an object the edit creates, grounded on the grid cell it goes to), `position` (a grid
cell NP such as "the top left", grounded on the cell), or `other` ("the colour", no box; "the colour of the red
circle", the object's box). Entries without `kind` are `present`.

Protocol: CIRR's (recall@{1,5,10,50} with the reference removed, recall_subset@{1,2,3}, avg) plus grounding: every
NP with a box has its in-context, isolated and tower maps scored by pointing, AUC and box share beside their chance
levels, split into present / added_or_position / rest (`training.evaluation.grounding`). `grounding` alone is the
mean in-context box share of present NPs, as before these measures existed.

The `binding` split (`shards/synthetic/binding.py`), when the files have it, is scored beside `split` under the same
CIRR protocol without grounding, plus `target_above_hard_negative`; its metrics read `binding/<metric>`:

    <root>/cirr/captions/cap.rc2.binding.json, <root>/cirr/image_splits/split.rc2.binding.json  (CIRR layout)
    <root>/binding.json = {"hard_negatives": {"<pairid>": {"image": name, "edited_object", "wrong_object", "edit"}},
                           ...}

Every binding query's reference holds two or more objects of the shape its caption edits, and its image set holds
the same edit applied to the wrong one. Data generated before the split existed is scored without it, with one
warning naming the command that adds it.
"""

from __future__ import annotations

import logging
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
    require_known,
)
from training.evaluation.benchmarks.cirr import captions_path, read_cirr_layout

logger = logging.getLogger(__name__)

SYNTHETIC_PROTOCOL = Protocol(
    recall_ks=(1, 5, 10, 50),
    subset_ks=(1, 2, 3),
    remove_reference=True,
    average=("recall@5", "recall_subset@1"),
    grounding=True,
)

BINDING_PROTOCOL = replace(SYNTHETIC_PROTOCOL, grounding=False, hard_negatives=True)
"""The binding split's: the same recalls, no grounding (cheap to score), the target against its hard negative."""
BINDING_SPLIT = "binding"
BINDING_FILE = "binding.json"
"""The binding split's sidecar, as `shards.synthetic.binding` names it; like every reader here, this one knows the
files' layout, not the code that writes them."""
ADD_BINDING = "python launch/make_synthetic.py --add-binding --out {root}"


Box = tuple[float, float, float, float]
"""(x0, y0, x1, y1) as fractions of the image."""


def _box(raw: object, path: Path, where: str) -> Box:
    if not isinstance(raw, (list, tuple)) or len(raw) != 4:
        raise BenchmarkError(f"{path}: {where} box must be [x0, y0, x1, y1], got {raw!r}")
    x0, y0, x1, y1 = (float(value) for value in raw)
    if not (0.0 <= x0 <= x1 <= 1.0 and 0.0 <= y0 <= y1 <= 1.0):
        raise BenchmarkError(f"{path}: {where} box {raw!r} must hold fractions with x0 <= x1 and y0 <= y1")
    return x0, y0, x1, y1


def _object_box(images: dict, reference: str, object_id: object, path: Path, where: str) -> Box:
    """The box of the reference object a `present` phrase names; the object must be listed."""
    objects = images.get(reference, {}).get("objects", [])
    match = [item for item in objects if item.get("id") == object_id]
    if not match:
        raise BenchmarkError(
            f"{path}: {where} names object {object_id!r}, which reference image {reference} does not list"
        )
    return _box(match[0].get("box"), path, f"images.{reference}.objects")


def read_synthetic(root: str | Path, split: str = "val") -> BenchmarkSplit:
    """Read the synthetic benchmark's split with each query's grounded noun phrases (every reference NP with a box).

    Raises:
        BenchmarkError: a missing file or image, a malformed box, or a `present` NP whose object the reference image
            lacks.
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
    grounded, without_box = 0, 0
    for query in benchmark.queries:
        phrases = []
        for position, phrase in enumerate(phrase_lists.get(query.query_id, ())):
            if phrase.get("image", "reference") != "reference":
                continue  # a phrase about the target image cannot be grounded on the reference
            where = f"captions.{split}.{query.query_id}[{position}]"
            kind = str(phrase.get("kind", "present"))
            if kind == "present":
                box = _object_box(images, query.reference, phrase.get("object"), objects_file, where)
            elif phrase.get("box") is None:
                without_box += 1  # e.g. "the colour": nothing on the image to point at
                continue
            else:
                box = _box(phrase["box"], objects_file, where)
            start = phrase.get("char_start")
            text = str(phrase["np"])
            phrases.append(GroundedPhrase(text, box, int(start) if start is not None else None, kind))
        grounded += len(phrases)
        queries.append(replace(query, phrases=tuple(phrases)))
    benchmark.queries = queries
    benchmark.version.update(
        {"objects_sha256": file_digest(objects_file), "grounded_phrases": grounded, "phrases_without_box": without_box}
    )
    return benchmark


def read_binding(root: str | Path) -> BenchmarkSplit:
    """Read the binding split with each query's hard negative (`Query.hard_negatives`).

    Raises:
        BenchmarkError: a missing or malformed file or image, or a query without a hard negative in its image set.
    """
    root = Path(root)
    benchmark = read_cirr_layout(
        root, BINDING_SPLIT, name="synthetic/binding", protocol=BINDING_PROTOCOL, require_labels=True
    )
    sidecar_file = root / BINDING_FILE
    sidecar = read_json(sidecar_file, "synthetic binding sidecar")
    negatives = sidecar.get("hard_negatives") if isinstance(sidecar, dict) else None
    if not isinstance(negatives, dict):
        raise BenchmarkError(f"{sidecar_file}: expected {{'hard_negatives': {{pairid: {{'image': ...}}}}, ...}}")
    queries = []
    for query in benchmark.queries:
        where = f"hard_negatives.{query.query_id}"
        entry = negatives.get(query.query_id)
        if not isinstance(entry, dict) or "image" not in entry:
            raise BenchmarkError(f"{sidecar_file}: {where} is missing; every binding query has a hard negative")
        require_known([entry["image"]], benchmark.image_paths, sidecar_file, where)
        if entry["image"] not in query.subset or entry["image"] == query.target:
            raise BenchmarkError(f"{sidecar_file}: {where} must be a member of the query's image set, not its target")
        queries.append(replace(query, hard_negatives=(entry["image"],)))
    benchmark.queries = queries
    benchmark.version["binding_sha256"] = file_digest(sidecar_file)
    return benchmark


@dataclass
class SyntheticSettings(DatasetSettings):
    """`eval.datasets.synthetic`."""

    split: str = "val"
    """The split to score."""
    binding: bool = True
    """Also score the `binding` split, reported as `binding/<metric>`; data without it is scored without it (one
    warning)."""


def _scored(settings: SyntheticSettings, splits: Sequence[str]) -> list[BenchmarkSplit]:
    del splits  # every split of the synthetic benchmark is labelled
    return [read_synthetic(settings.root, settings.split)]


def _diagnostics(settings: SyntheticSettings) -> list[BenchmarkSplit]:
    if not settings.binding:
        return []
    if not captions_path(Path(settings.root), BINDING_SPLIT).is_file():
        logger.warning(
            "synthetic benchmark at %s has no binding split (generated before it existed): binding/* metrics are "
            "not reported; `%s` adds it without changing the other files",
            settings.root,
            ADD_BINDING.format(root=settings.root),
        )
        return []
    return [read_binding(settings.root)]


register_benchmark(
    Benchmark(
        name="synthetic",
        protocol=SYNTHETIC_PROTOCOL,
        read=_scored,
        summary="the embedded synthetic benchmark (`launch/make_synthetic.py`): the CIRR protocol plus grounding, "
        "each noun phrase's in-context, isolated and tower maps against its box (pointing, AUC, box share, each "
        "beside its chance level; split by what the phrase names), and `grounding`, the in-context box share of "
        "phrases naming a reference object. With `binding` (default on, when the data has it): the binding split's "
        "recalls and `target_above_hard_negative` as `binding/<metric>`",
        settings=SyntheticSettings,
        read_diagnostics=_diagnostics,
    )
)
