"""Raw CIR datasets as triplets: readers for the CIRR layout, LaSCo JSON and JSONL manifests, and their mixture.

The readers of the paper's released formats (CIRR_R, Hotel-CIR) and of FashionIQ live in `released_sources`;
`read_source` dispatches to all of them by `SourceConfig.kind`. `Triplet` and `SourceError` (defined in
`triplets`) are imported from here by callers.

Every reader returns `Triplet`s in file order with a stable id `<source name>-<native id>`. Image paths are
resolved here but not opened: a missing or unreadable image is the shard builder's business (skip and count),
while a missing or malformed annotation file is an error that names the file.
"""

from __future__ import annotations

import json
import math
import random
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from shards.builder.released_sources import read_cirr_r, read_fashioniq_train, read_hotel_cir
from shards.builder.triplets import SourceError, Triplet, iter_json_list, load_json, phrase_boxes, require, resolve
from shards.config import SourceConfig
from shards.format import sanitize_key


@dataclass(frozen=True, slots=True)
class MixtureItem:
    """One sample of the aggregated mixture: a triplet, possibly one of several copies of it."""

    key: str
    """Unique sample key (`shards.format` rules); copies after the first carry a `-rN` suffix."""
    triplet: Triplet
    copy: int
    """0 for the first copy of the triplet, 1, 2, ... for the repeats a weight above 1 asks for."""


def read_cirr(source: SourceConfig) -> list[Triplet]:
    """Triplets of `<path>/cirr/captions/cap.rc2.{split}.json`, images named through `split.rc2.{split}.json`.

    Raises:
        SourceError: an annotation file is missing or malformed, or the split has no targets (test1).
    """
    root = Path(source.path)
    captions_path = root / "cirr" / "captions" / f"cap.rc2.{source.split}.json"
    images_path = root / "cirr" / "image_splits" / f"split.rc2.{source.split}.json"
    entries = iter_json_list(captions_path, f"CIRR captions of split {source.split!r}")
    image_paths = load_json(images_path, f"CIRR image split of split {source.split!r}")
    if not isinstance(image_paths, dict):
        raise SourceError(f"{images_path} must hold an object of name -> path")
    triplets = []
    resolved: dict[str, str | None] = {}  # one path string per image, shared by every triplet that names it

    def image_path(name: str) -> str | None:
        if name not in resolved:
            resolved[name] = resolve(root, image_paths[name]) if name in image_paths else None
        return resolved[name]

    for position, entry in enumerate(entries):
        where = f"{captions_path} entry {position}"
        require(entry, ("pairid", "reference", "caption"), where)
        if entry.get("target_hard") is None:
            raise SourceError(
                f"{where} (pairid {entry['pairid']}) has no target_hard: split {source.split!r} has no targets "
                "and cannot be built into training shards (test1 is for submissions only)"
            )
        reference, target = str(entry["reference"]), str(entry["target_hard"])
        triplets.append(
            Triplet(
                id=f"{source.name}-{entry['pairid']}",
                source=source.name,
                caption=str(entry["caption"]),
                reference_name=reference,
                target_name=target,
                reference_path=image_path(reference),
                target_path=image_path(target),
            )
        )
    return triplets


def _lasco_image(entry: dict, field: str, where: str) -> str:
    value = entry[field]
    if not isinstance(value, list) or len(value) != 2 or not isinstance(value[1], str):
        raise SourceError(f"{where}: {field!r} must be [coco_id, relative path], got {value!r}")
    return value[1]


def read_lasco(source: SourceConfig) -> list[Triplet]:
    """Triplets of a LaSCo `lasco_{split}.json`; image paths are relative to `image_root` (the COCO root).

    Raises:
        SourceError: the file is missing or an entry is malformed.
    """
    path = Path(source.path)
    entries = iter_json_list(path, "LaSCo annotation file")
    image_root = Path(source.image_root or ".")
    triplets = []
    for position, entry in enumerate(entries):
        where = f"{path} entry {position}"
        require(entry, ("qid", "query-image", "query-text", "target-image"), where)
        reference = _lasco_image(entry, "query-image", where)
        target = _lasco_image(entry, "target-image", where)
        triplets.append(
            Triplet(
                id=f"{source.name}-{entry['qid']}",
                source=source.name,
                caption=str(entry["query-text"]),
                reference_name=reference,
                target_name=target,
                reference_path=resolve(image_root, reference),
                target_path=resolve(image_root, target),
            )
        )
    return triplets


def read_jsonl(source: SourceConfig) -> list[Triplet]:
    """Triplets of a JSONL manifest, one `{"id", "reference", "target", "caption"}` a line.

    Image paths are relative to the manifest's directory. Blank lines are ignored. An optional `phrases` list,
    `[{"text", "box": [x0, y0, x1, y1]}]`, gives the reference-image region of noun phrases (fractions), stored with
    each matching NP in the shards (the pretraining objective of the towers uses them).

    Raises:
        SourceError: the manifest is missing, or a line is not a JSON object with those keys (file and line named).
    """
    path = Path(source.path)
    if not path.is_file():
        raise SourceError(f"JSONL manifest not found: {path}")
    root = path.parent
    triplets = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path} line {number}"
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as error:
                raise SourceError(f"{where}: not valid JSON ({error.msg})") from error
            require(entry, ("id", "reference", "target", "caption"), where)
            reference, target = str(entry["reference"]), str(entry["target"])
            boxes = phrase_boxes(entry.get("phrases", []), where)
            triplets.append(
                Triplet(
                    id=f"{source.name}-{entry['id']}",
                    source=source.name,
                    caption=str(entry["caption"]),
                    reference_name=reference,
                    target_name=target,
                    reference_path=resolve(root, reference),
                    target_path=resolve(root, target),
                    phrase_boxes=boxes,
                )
            )
    return triplets


_READERS = {
    "cirr": read_cirr,
    "lasco": read_lasco,
    "jsonl": read_jsonl,
    "cirr_r": read_cirr_r,
    "hotel_cir": read_hotel_cir,
    "fashioniq": read_fashioniq_train,
}


def read_source(source: SourceConfig) -> list[Triplet]:
    """The triplets of one configured source, through the reader of its kind."""
    return _READERS[source.kind](source)


def _copies(weight: float, rng: random.Random) -> int:
    whole = math.floor(weight)
    return whole + (1 if rng.random() < weight - whole else 0)


def _source_seed(seed: int, name: str) -> int:
    # A stable per-source stream: adding or reordering sources does not change another source's draws.
    return (seed * 1_000_003) ^ zlib.crc32(name.encode("utf-8"))


def mixture(
    sources: Sequence[SourceConfig], triplets_by_source: dict[str, list[Triplet]], seed: int
) -> list[MixtureItem]:
    """The weighted mixture: each triplet taken floor(weight) times plus once more with probability frac(weight).

    The draws are seeded by `seed` and the source name, so the mixture is the same for the same seed.

    Raises:
        SourceError: two samples would share a key (duplicate ids in a source, or ids equal after sanitising).
    """
    items: list[MixtureItem] = []
    owners: dict[str, str] = {}
    for source in sources:
        rng = random.Random(_source_seed(seed, source.name))
        for triplet in triplets_by_source[source.name]:
            base = sanitize_key(triplet.id)
            for copy in range(_copies(source.weight, rng)):
                key = base if copy == 0 else f"{base}-r{copy}"
                if key in owners:
                    raise SourceError(
                        f"sample key {key!r} of triplet {triplet.id!r} is not unique (also from {owners[key]!r}); "
                        f"ids in source {source.name!r} must be unique"
                    )
                owners[key] = triplet.id
                items.append(MixtureItem(key=key, triplet=triplet, copy=copy))
    return items
