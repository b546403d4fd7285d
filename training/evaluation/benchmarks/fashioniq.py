"""FashionIQ val in its distributed layout, one split per category.

    <root>/captions/cap.{category}.val.json       [{"target", "candidate", "captions": [c0, c1]}, ...]
    <root>/image_splits/split.{category}.val.json [name, ...]   (the category's gallery)
    <root>/images/<name>.png

Protocol: the query text joins the two captions as `"{c0.strip('.?, ').capitalize()} and {c1.strip('.?, ')}"`; the
reference is NOT removed; recall@10 and recall@50 per category, averaged over the categories by the runner.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from shards.caption_joining import FASHIONIQ_CATEGORIES, fashioniq_text
from training.evaluation.benchmarks.base import (
    Benchmark,
    BenchmarkError,
    BenchmarkSplit,
    DatasetSettings,
    Protocol,
    Query,
    file_digest,
    read_json,
    register_benchmark,
    require_images,
    require_keys,
    require_known,
)

# The caption template is shared with the FashionIQ training source, so it lives in `shards`.
CATEGORIES = FASHIONIQ_CATEGORIES
FASHIONIQ_PROTOCOL = Protocol(recall_ks=(10, 50), remove_reference=False)


def read_fashioniq(root: str | Path, category: str, split: str = "val") -> BenchmarkSplit:
    """Read one FashionIQ category.

    Raises:
        BenchmarkError: a missing caption/split file or image, a malformed entry, or a target the gallery lacks.
    """
    if category not in CATEGORIES:
        raise BenchmarkError(f"unknown FashionIQ category {category!r}; known: {CATEGORIES}")
    root = Path(root)
    captions_file = root / "captions" / f"cap.{category}.{split}.json"
    split_file = root / "image_splits" / f"split.{category}.{split}.json"
    entries = read_json(captions_file, "FashionIQ captions")
    listing = read_json(split_file, "FashionIQ image split")
    if not isinstance(entries, list) or not isinstance(listing, list):
        raise BenchmarkError(f"{captions_file} and {split_file} must both hold JSON lists")
    gallery = list(dict.fromkeys(str(name) for name in listing))
    known = dict.fromkeys(gallery)
    image_paths = {name: root / "images" / f"{name}.png" for name in gallery}
    queries = []
    for position, entry in enumerate(entries):
        where = f"entry {position}"
        require_keys(entry, ("target", "candidate", "captions"), captions_file, where)
        require_known([str(entry["target"])], known, captions_file, where)
        try:
            text = fashioniq_text(entry["captions"])
        except (ValueError, AttributeError) as error:
            raise BenchmarkError(f"{captions_file}: {where}: {error}") from error
        reference = str(entry["candidate"])
        image_paths.setdefault(reference, root / "images" / f"{reference}.png")
        queries.append(
            Query(
                query_id=str(position),
                reference=reference,
                text=text,
                target=str(entry["target"]),
                ground_truth=(str(entry["target"]),),
            )
        )
    if not queries:
        raise BenchmarkError(f"{captions_file}: no caption entries")
    require_images(image_paths, f"FashionIQ {category} (root {root})")
    return BenchmarkSplit(
        name=f"fashioniq/{category}",
        split=split,
        queries=queries,
        gallery=gallery,
        image_paths=image_paths,
        protocol=FASHIONIQ_PROTOCOL,
        version={
            "captions_sha256": file_digest(captions_file),
            "image_split_sha256": file_digest(split_file),
            "queries": len(queries),
            "gallery": len(gallery),
        },
    )


@dataclass
class FashionIQSettings(DatasetSettings):
    """`eval.datasets.fashioniq`."""

    categories: list[str] = field(default_factory=lambda: list(CATEGORIES))
    """Categories scored; the averages run over these."""

    def __post_init__(self) -> None:
        unknown = [name for name in self.categories if name not in CATEGORIES]
        if unknown:
            raise ValueError(f"categories has unknown {unknown}; known: {', '.join(CATEGORIES)}")


def _scored(settings: FashionIQSettings, splits: Sequence[str]) -> list[BenchmarkSplit]:
    if "val" not in splits:
        return []
    return [read_fashioniq(settings.root, category) for category in settings.categories]


register_benchmark(
    Benchmark(
        name="fashioniq",
        protocol=FASHIONIQ_PROTOCOL,
        read=_scored,
        summary="FashionIQ val: R@10, R@50 per category (dress, shirt, toptee) and their averages; reference kept",
        settings=FashionIQSettings,
    )
)
