"""Writing the synthetic benchmark: scenes, captions and image sets of every split, in CIRR's layout, with a summary.

The `binding` split (`binding.py`) is written after the others into files of its own, so whether it is there
changes no byte of the train, val and test1 files, the trees, objects.json or the marker.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from shards.synthetic.binding import write_binding
from shards.synthetic.cirr_files import MARKER, prepare_root, write_annotations, write_images
from shards.synthetic.render import BACKGROUNDS, PALETTE, SHAPES
from shards.synthetic.scenes import SceneSpec
from shards.synthetic.sets import SplitContent, SplitPlan, build_split

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
DEFAULT_TRIPLETS = {"train": 6000, "val": 1000, "test1": 300}
DEFAULT_TRIPLETS_PER_SET = {"train": 5, "val": 5, "test1": 5}
"""Every edited member of a set is the target of one caption. A reference's own ranking of its set is then right
for exactly one of them, so image similarity alone scores exactly chance on subset recall (1/5)."""
DEFAULT_SETS_PER_REFERENCE = {"train": 2, "val": 3, "test1": 3}
"""Image sets around one reference scene. Evaluation splits put more look-alike edits of each reference in the
gallery (image similarity alone finds the target at most once in 15 on recall@1); train spends its images on more
distinct references instead."""
DEFAULT_CANVAS = 128
"""Rendered image side in pixels; objects stay recognisable at the tiny model's 64 x 64 input."""


@dataclass
class SyntheticSummary:
    """What `generate` wrote."""

    out_dir: str
    seed: int
    triplets: dict[str, int] = field(default_factory=dict)
    images: dict[str, int] = field(default_factory=dict)
    image_sets: dict[str, int] = field(default_factory=dict)
    """Per split (train, val, test1, and binding when it was written)."""
    seconds: float = 0.0

    def line(self) -> str:
        """One human-readable summary line."""
        parts = ", ".join(
            f"{split}: {self.triplets[split]} triplets / {self.image_sets[split]} sets / {self.images[split]} images"
            for split in self.triplets
        )
        return f"synthetic benchmark (seed {self.seed}) in {self.out_dir}: {parts}; {self.seconds:.1f} s"


def generate(
    out_dir: str | Path,
    seed: int = 0,
    n_train: int = DEFAULT_TRIPLETS["train"],
    n_val: int = DEFAULT_TRIPLETS["val"],
    n_test: int = DEFAULT_TRIPLETS["test1"],
    *,
    spec: SceneSpec | None = None,
    canvas: int = DEFAULT_CANVAS,
    triplets_per_set: dict[str, int] | None = None,
    sets_per_reference: dict[str, int] | None = None,
    max_edits: int = 2,
    n_binding: int = 0,
    workers: int = 1,
    show_progress: bool = False,
) -> SyntheticSummary:
    """Write the synthetic benchmark in CIRR layout under `out_dir`.

    Args:
        out_dir: benchmark root (created; a previous generation there is replaced; any other non-empty directory
            is refused).
        seed: everything written depends only on this and the other arguments.
        n_train, n_val, n_test: caption entries of the train, val and test1 splits.
        spec: shapes, colours, objects per scene and edit mix; `SceneSpec()` by default.
        canvas: image side in pixels.
        triplets_per_set: caption entries per image set, by split (train, val, test1); missing splits take
            DEFAULT_TRIPLETS_PER_SET.
        sets_per_reference: image sets sharing one reference scene, by split; more sets put more look-alike edits
            of the reference in the gallery, which image similarity alone cannot tell apart. Missing splits take
            DEFAULT_SETS_PER_REFERENCE.
        max_edits: most edits one caption asks for (1 or 2 keeps the captions readable).
        n_binding: queries of the `binding` split (`binding.py`); 0 writes none. `launch/make_synthetic.py`
            writes DEFAULT_BINDING_TRIPLETS. The other splits' bytes do not depend on it.
        workers: rendering processes; the output does not depend on it.
        show_progress: show a tqdm bar while rendering.

    Returns:
        Counts per split and the wall time.
    """
    started = time.perf_counter()
    spec = spec or SceneSpec()
    per_set = {**DEFAULT_TRIPLETS_PER_SET, **(triplets_per_set or {})}
    per_reference = {**DEFAULT_SETS_PER_REFERENCE, **(sets_per_reference or {})}
    if canvas < 32:
        raise ValueError(f"canvas must be >= 32 pixels, got {canvas}")
    if n_binding < 0:
        raise ValueError(f"n_binding must be >= 0, got {n_binding}")
    for label, names, known in (
        ("shapes", spec.shapes, SHAPES),
        ("colors", spec.colors, PALETTE),
        ("backgrounds", spec.backgrounds, BACKGROUNDS),
    ):
        if unknown := sorted(set(names) - set(known)):
            raise ValueError(f"SceneSpec.{label}: unknown {unknown}; known: {sorted(known)}")
    root = Path(out_dir)
    prepare_root(root)
    sizes = {"train": n_train, "val": n_val, "test1": n_test}
    splits: dict[str, SplitContent] = {}
    for split, count in sizes.items():
        plan = SplitPlan(count, per_set[split], sets_per_reference=per_reference[split], max_edits=max_edits)
        splits[split] = build_split(split, plan, seed, spec)
    summary = SyntheticSummary(
        out_dir=str(root),
        seed=seed,
        triplets={split: len(content.triplets) for split, content in splits.items()},
        images={split: len(content.images) for split, content in splits.items()},
        image_sets={split: content.image_sets for split, content in splits.items()},
    )
    all_images = [image for content in splits.values() for image in content.images]
    write_images(root, all_images, canvas, workers, show_progress)
    marker = {
        "schema_version": SCHEMA_VERSION,
        "seed": seed,
        "canvas": canvas,
        "spec": asdict(spec),
        "triplets_per_set": per_set,
        "sets_per_reference": per_reference,
        "max_edits": max_edits,
        "triplets": dict(summary.triplets),  # copies: the binding split's counts join the summary, not the marker
        "images": dict(summary.images),
        "image_sets": dict(summary.image_sets),
    }
    write_annotations(root, splits, canvas, marker)
    binding = write_binding(root, n_binding, seed, spec, canvas, workers, show_progress).content
    if binding.triplets:
        summary.triplets["binding"] = len(binding.triplets)
        summary.images["binding"] = len(binding.images)
        summary.image_sets["binding"] = binding.image_sets
    summary.seconds = time.perf_counter() - started
    logger.info(summary.line())
    return summary


__all__ = [
    "DEFAULT_SETS_PER_REFERENCE",
    "DEFAULT_TRIPLETS",
    "DEFAULT_TRIPLETS_PER_SET",
    "MARKER",
    "SceneSpec",
    "SyntheticSummary",
    "generate",
]
