"""Image sets and triplets of one split: a reference scene, its edits, and captions that ask for one of them.

For every reference scene a pool of commuting edits is drawn, and each non-empty subset of at most `max_edits`
of them is one edited image. Those images are dealt into image sets of six (the reference plus five edits), so
every member of a set is a small edit of the same reference and image similarity cannot single out the target.
Edits in a set share parts ("remove the red circle" next to "remove the red circle and add ..."), so the text alone
cannot single it out either: only the reference and the text together name the target.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass

from shards.synthetic.captions import Caption, compose_caption
from shards.synthetic.scenes import Edit, Scene, SceneSpec, apply_edits, propose_edit_pool, random_scene

SET_SIZE = 6
"""Members of an image set, the reference included (CIRR's value)."""
IMAGE_DIRS = {"train": "train", "val": "dev", "test1": "test1"}
"""Directory of each caption split's images, as in CIRR (validation images live under dev/)."""
NAME_PREFIXES = {"train": "train", "val": "dev", "test1": "test1"}
TRAIN_SUBDIRS = 100
"""CIRR spreads its train images over numbered subdirectories."""


@dataclass(frozen=True)
class SplitPlan:
    """How one split is laid out."""

    triplets: int
    """Caption entries to write."""
    triplets_per_set: int
    """Entries per image set, each with a different target."""
    sets_per_reference: int = 2
    """Image sets built around one reference scene (they share the reference, never an edited image)."""
    max_edits: int = 2
    """Most edits one caption asks for."""

    def __post_init__(self) -> None:
        if self.triplets < 0:
            raise ValueError(f"triplets must be >= 0, got {self.triplets}")
        if not 1 <= self.triplets_per_set <= SET_SIZE - 1:
            raise ValueError(f"triplets_per_set must be in [1, {SET_SIZE - 1}], got {self.triplets_per_set}")
        if self.sets_per_reference < 1 or self.max_edits < 1:
            raise ValueError("sets_per_reference and max_edits must be >= 1")


@dataclass(frozen=True)
class ImageRecord:
    name: str
    relative_path: str
    """Relative to the benchmark root, CIRR style: `./train/12/train-12-3-img0.png`."""
    scene: Scene


@dataclass(frozen=True)
class Triplet:
    pairid: int
    reference: str
    target: str
    caption: Caption
    set_id: int
    members: tuple[str, ...]


@dataclass
class SplitContent:
    images: list[ImageRecord]
    triplets: list[Triplet]
    image_sets: int


def pool_size_for(edited_images: int, max_edits: int) -> int:
    """Smallest edit pool whose non-empty subsets of at most `max_edits` edits number at least `edited_images`."""
    size = 1
    while sum(math.comb(size, k) for k in range(1, max_edits + 1)) < edited_images:
        size += 1
    return size


def build_split(split: str, plan: SplitPlan, seed: int, spec: SceneSpec) -> SplitContent:
    """Scenes, image sets and captioned triplets of `split` (train, val or test1); deterministic in (seed, split)."""
    prefix, image_dir = NAME_PREFIXES[split], IMAGE_DIRS[split]
    edited_per_reference = (SET_SIZE - 1) * plan.sets_per_reference
    pool_size = pool_size_for(edited_per_reference, plan.max_edits)
    seen_scenes: set[tuple] = set()  # no two images of a split look alike, so every target is unique in the gallery
    images: list[ImageRecord] = []
    triplets: list[Triplet] = []
    set_id = 0
    base = 0
    while len(triplets) < plan.triplets:
        rng = random.Random(f"context-cir-synthetic:{seed}:{split}:{base}")
        reference, programs = _draw_reference(rng, spec, pool_size, plan.max_edits, edited_per_reference, seen_scenes)

        def record(index: int, scene: Scene, base: int = base) -> ImageRecord:
            name = f"{prefix}-{base}-{index}-img0"
            folder = f"{image_dir}/{base % TRAIN_SUBDIRS}" if split == "train" else image_dir
            return ImageRecord(name, f"./{folder}/{name}.png", scene)

        reference_image = record(0, reference)
        edited = [record(index + 1, apply_edits(reference, program)) for index, program in enumerate(programs)]
        images.append(reference_image)
        for group in range(plan.sets_per_reference):
            if len(triplets) >= plan.triplets:
                break
            chosen = list(range(group * (SET_SIZE - 1), (group + 1) * (SET_SIZE - 1)))
            members = [reference_image.name] + [edited[i].name for i in chosen]
            rng.shuffle(members)
            images.extend(edited[i] for i in chosen)
            for target_index in rng.sample(chosen, plan.triplets_per_set):
                if len(triplets) >= plan.triplets:
                    break
                caption = compose_caption(rng, reference, programs[target_index])
                triplets.append(
                    Triplet(
                        pairid=len(triplets),
                        reference=reference_image.name,
                        target=edited[target_index].name,
                        caption=caption,
                        set_id=set_id,
                        members=tuple(members),
                    )
                )
            set_id += 1
        base += 1
    return SplitContent(images, triplets, set_id)


def _draw_reference(
    rng: random.Random,
    spec: SceneSpec,
    pool_size: int,
    max_edits: int,
    edited_count: int,
    seen_scenes: set[tuple],
) -> tuple[Scene, list[tuple[Edit, ...]]]:
    """A reference scene and `edited_count` distinct edit programs whose images are all new to the split."""
    for _attempt in range(1000):
        reference = random_scene(rng, spec)
        try:
            pool = propose_edit_pool(rng, reference, spec, pool_size)
        except ValueError:
            continue
        subsets = [combo for k in range(1, max_edits + 1) for combo in itertools.combinations(pool, k)]
        programs = rng.sample(subsets, edited_count)
        keys = [reference.canonical()] + [apply_edits(reference, program).canonical() for program in programs]
        if len(set(keys)) == len(keys) and not seen_scenes.intersection(keys):
            seen_scenes.update(keys)
            return reference, programs
    raise RuntimeError(f"could not draw {edited_count} distinct edited scenes with {spec}; allow more variety")
