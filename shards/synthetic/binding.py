"""The `binding` split: queries whose reference holds two or more objects of one shape, told apart by colour.

On a scene with a red and a blue square, "make the red square green" has the red square turned green as its target,
and the split's gallery, inside the query's own image set, also holds the same edit applied to the blue square: the
hard negative. A model that reads "square" and "green" but binds the colour "red" loosely ranks the two alike, so
recall on this split measures attribute-object binding, which the main splits dilute among easier edits.

Each reference yields one image set of six: the reference, two edit kinds each applied to either of two same-shape
objects A and B (four captions; each edit's mirror image is its hard negative), and a third kind applied to A or B
(a look-alike that no caption asks for). Image similarity alone cannot tell an edit of A from the same edit of B.

The split is written beside the others in new files only, so adding it leaves every byte of them unchanged:

    <root>/binding/binding-<reference>-<member>-img0.png
    <root>/cirr/captions/cap.rc2.binding.json       CIRR caption entries (with target_hard)
    <root>/cirr/image_splits/split.rc2.binding.json image name -> ./binding/<name>.png
    <root>/binding.json     what generated it; per query its hard negative, the edited and the wrong object and the
                            edit kind; the images' objects with boxes and the captions' NPs, as objects.json has them

It draws from its own random stream (`context-cir-synthetic:<seed>:binding:<reference>`), so its content depends
only on the seed, the scene spec, the canvas and its query count.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from shards.synthetic.captions import compose_caption
from shards.synthetic.cirr_files import (
    MARKER,
    caption_entries,
    image_entry,
    mention_entry,
    write_images,
    write_json,
)
from shards.synthetic.descriptions import describe
from shards.synthetic.scenes import CELL_NAMES, SIZES, Edit, Scene, SceneObject, SceneSpec, apply_edits
from shards.synthetic.sets import ImageRecord, SplitContent, Triplet

BINDING_SPLIT = "binding"
"""The split's name in the CIRR file names (`cap.rc2.binding.json`) and the eval's metric prefix."""
BINDING_DIR = "binding"
"""Folder of the split's images under the benchmark root."""
BINDING_FILE = "binding.json"
"""The split's sidecar: generator arguments, hard negatives, objects and caption NPs."""
BINDING_SCHEMA_VERSION = 1
DEFAULT_BINDING_TRIPLETS = 400
"""Queries `launch/make_synthetic.py` writes by default: 100 references, 600 images; about a second to score."""
BINDING_KINDS = ("recolour", "resize", "remove", "replace")
"""Edits of an existing object; `add` names no object, so it cannot be applied to the wrong one."""
QUERIES_PER_REFERENCE = 4
"""Two edit kinds, each asked for on A and on B."""
THIRD_SAME_SHAPE_PROBABILITY = 1 / 3
"""How often a reference holds three objects of the shape instead of two (one of them only a bystander)."""


@dataclass(frozen=True)
class HardNegative:
    """What makes a binding query hard: the same edit applied to the other object of the shape."""

    image: str
    """The hard negative's image name (a member of the query's image set)."""
    edited_object: str
    """Id of the reference object the caption names and the target edits."""
    wrong_object: str
    """Id of the other same-shape object, which the hard negative edits instead."""
    edit: str
    """The edit kind (one of BINDING_KINDS)."""


@dataclass
class BindingContent:
    """The split's scenes, image sets and triplets, and each triplet's hard negative by pairid."""

    content: SplitContent
    hard_negatives: dict[int, HardNegative]


def build_binding(count: int, seed: int, spec: SceneSpec) -> BindingContent:
    """`count` binding queries, QUERIES_PER_REFERENCE per reference scene; deterministic in (seed, spec, count).

    Raises:
        ValueError: `count` is negative.
        RuntimeError: `spec` leaves too little variety for a binding reference (e.g. two colours only).
    """
    if count < 0:
        raise ValueError(f"binding queries must be >= 0, got {count}")
    seen_scenes: set[tuple] = set()  # no two images of the split look alike, so every target is unique in the gallery
    images: list[ImageRecord] = []
    triplets: list[Triplet] = []
    hard_negatives: dict[int, HardNegative] = {}
    base = 0
    while len(triplets) < count:
        rng = random.Random(f"context-cir-synthetic:{seed}:{BINDING_SPLIT}:{base}")
        reference, pair, paired, single = _draw_reference(rng, spec, seen_scenes)

        def record(index: int, scene: Scene, base: int = base) -> ImageRecord:
            name = f"{BINDING_SPLIT}-{base}-{index}-img0"
            return ImageRecord(name, f"./{BINDING_DIR}/{name}.png", scene)

        reference_image = record(0, reference)
        programs = [edit for edits in paired for edit in edits] + [single]
        edited = [record(index + 1, apply_edits(reference, [edit])) for index, edit in enumerate(programs)]
        images += [reference_image, *edited]
        members = [reference_image.name] + [image.name for image in edited]
        rng.shuffle(members)
        for kind_index, edits in enumerate(paired):
            for side in (0, 1):
                if len(triplets) >= count:
                    break
                edit = edits[side]
                pairid = len(triplets)
                triplets.append(
                    Triplet(
                        pairid=pairid,
                        reference=reference_image.name,
                        target=edited[2 * kind_index + side].name,
                        caption=compose_caption(rng, reference, (edit,)),
                        set_id=base,
                        members=tuple(members),
                    )
                )
                hard_negatives[pairid] = HardNegative(
                    image=edited[2 * kind_index + 1 - side].name,
                    edited_object=pair[side],
                    wrong_object=pair[1 - side],
                    edit=edit.kind,
                )
        base += 1
    return BindingContent(SplitContent(images, triplets, base), hard_negatives)


def _draw_reference(
    rng: random.Random, spec: SceneSpec, seen_scenes: set[tuple]
) -> tuple[Scene, tuple[str, str], list[tuple[Edit, Edit]], Edit]:
    """A reference with two same-shape objects (A, B), two edit kinds as (edit of A, same edit of B), and a third
    kind's edit of A or B; every image new to the split."""
    for _attempt in range(1000):
        reference, pair = binding_scene(rng, spec)
        options = {kind: _edit_options(kind, reference, pair[0], spec) for kind in BINDING_KINDS}
        kinds = [kind for kind in BINDING_KINDS if options[kind]]
        if len(kinds) < 3:
            continue
        chosen = rng.sample(kinds, 3)
        paired = []
        for kind in chosen[:2]:
            values = rng.choice(options[kind])
            paired.append((_edit(kind, pair[0], values, reference), _edit(kind, pair[1], values, reference)))
        single = _edit(chosen[2], rng.choice(pair), rng.choice(options[chosen[2]]), reference)
        programs = [edit for edits in paired for edit in edits] + [single]
        keys = [reference.canonical()] + [apply_edits(reference, [edit]).canonical() for edit in programs]
        if len(set(keys)) == len(keys) and not seen_scenes.intersection(keys):
            seen_scenes.update(keys)
            return reference, pair, paired, single
    raise RuntimeError(f"could not draw a binding reference with 3 edit kinds and new images from {spec}")


def binding_scene(rng: random.Random, spec: SceneSpec) -> tuple[Scene, tuple[str, str]]:
    """A scene with two (sometimes three) objects of one shape in distinct colours and one size, plus objects of
    other shapes; (colour, shape) pairs stay unique, so "the red square" still names one object. Returns the scene
    and the ids of two of its same-shape objects, A and B."""
    count = rng.randint(max(2, spec.min_objects), spec.max_objects)
    shape = rng.choice(spec.shapes)
    same = 2
    if count >= 3 and len(spec.colors) >= 4 and rng.random() < THIRD_SAME_SHAPE_PROBABILITY:
        same = 3  # a free colour of the shape remains, so a recolour of A or B stays possible
    others = [(color, other) for color in spec.colors for other in spec.shapes if other != shape]
    kinds = [(color, shape) for color in rng.sample(spec.colors, same)] + rng.sample(others, count - same)
    rng.shuffle(kinds)
    size = rng.choice(SIZES)  # one size for the shape, so a resize of A and the same resize of B both change it
    cells = rng.sample(sorted(CELL_NAMES), count)
    objects = tuple(
        SceneObject(
            id=f"o{index}",
            shape=object_shape,
            color=color,
            size=size if object_shape == shape else rng.choice(SIZES),
            cell=cell,
            offset=(
                round(rng.uniform(-1, 1) * spec.max_jitter, 3),
                round(rng.uniform(-1, 1) * spec.max_jitter, 3),
            ),
        )
        for index, (cell, (color, object_shape)) in enumerate(zip(cells, kinds))
    )
    same_shape = [obj.id for obj in objects if obj.shape == shape]
    first, second = rng.sample(same_shape, 2)
    return Scene(objects, background=rng.choice(spec.backgrounds)), (first, second)


def _edit_options(kind: str, scene: Scene, subject_id: str, spec: SceneSpec) -> list[dict[str, Any]]:
    """The possible new attribute values of one edit kind on `subject_id`; A and B share shape and size, so the
    same values apply to either. Recolours and replacements keep (colour, shape) pairs unique in the scene."""
    subject = scene.by_id(subject_id)
    used = {obj.kind for obj in scene.objects}
    if kind == "remove":
        return [{}]
    if kind == "resize":
        return [{"size": SIZES[1 - SIZES.index(subject.size)]}]
    if kind == "recolour":
        return [{"color": color} for color in spec.colors if (color, subject.shape) not in used]
    # replace: another shape, in a colour that keeps (colour, shape) pairs unique
    return [
        {"color": color, "shape": shape}
        for color in spec.colors
        for shape in spec.shapes
        if shape != subject.shape and (color, shape) not in used
    ]


def _edit(kind: str, subject: str, values: dict[str, Any], scene: Scene) -> Edit:
    shape = values.get("shape", scene.by_id(subject).shape)
    claims = ((values["color"], shape),) if "color" in values else ()
    new_id = f"o{len(scene.objects)}" if kind == "replace" else None
    return Edit(kind, subject=subject, new_id=new_id, claims=claims, **values)


def write_binding(
    root: str | Path,
    count: int,
    seed: int,
    spec: SceneSpec,
    canvas: int,
    workers: int = 1,
    show_progress: bool = False,
) -> BindingContent:
    """Write (or rewrite) the binding split's files under `root`, touching no other file.

    `count` 0 removes the split. Returns what was written.
    """
    root = Path(root)
    remove_binding(root)
    binding = build_binding(count, seed, spec)
    if not binding.content.triplets:
        return binding
    content = binding.content
    captions_file, split_file, sidecar_file = binding_paths(root)[:3]
    write_images(root, content.images, canvas, workers, show_progress)
    write_json(split_file, {image.name: image.relative_path for image in content.images})
    scenes = {image.name: image.scene for image in content.images}
    sidecar = {
        "generator": {
            "schema_version": BINDING_SCHEMA_VERSION,
            "seed": seed,
            "canvas": canvas,
            "spec": asdict(spec),
            "triplets": len(content.triplets),
            "images": len(content.images),
            "image_sets": content.image_sets,
        },
        "hard_negatives": {str(pairid): asdict(negative) for pairid, negative in binding.hard_negatives.items()},
        "images": {image.name: image_entry(image.scene, canvas, describe(image.scene)) for image in content.images},
        "captions": {
            BINDING_SPLIT: {
                str(triplet.pairid): [
                    mention_entry(mention, scenes[triplet.reference]) for mention in triplet.caption.mentions
                ]
                for triplet in content.triplets
            }
        },
        "trees": {str(triplet.pairid): triplet.caption.tree for triplet in content.triplets},
    }
    write_json(sidecar_file, sidecar, compact=True)
    # The captions file last and whole (renamed into place): readers take it to mean the split is complete, and an
    # eval may be reading the benchmark while `--add-binding` writes.
    partial = captions_file.with_name(captions_file.name + ".partial")
    write_json(partial, caption_entries(BINDING_SPLIT, content))
    os.replace(partial, captions_file)
    return binding


def binding_paths(root: Path) -> list[Path]:
    """Every file or folder the binding split owns under `root`: its captions file first, whose presence marks the
    split as there, then its image list, sidecar and image folder."""
    return [
        root / "cirr" / "captions" / f"cap.rc2.{BINDING_SPLIT}.json",
        root / "cirr" / "image_splits" / f"split.rc2.{BINDING_SPLIT}.json",
        root / BINDING_FILE,
        root / BINDING_DIR,
    ]


def remove_binding(root: Path) -> None:
    """Delete the binding split's files (its captions file first), and nothing else."""
    for path in binding_paths(root):
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def add_binding(
    root: str | Path,
    count: int = DEFAULT_BINDING_TRIPLETS,
    seed: int | None = None,
    workers: int = 1,
    show_progress: bool = False,
) -> BindingContent:
    """Add the binding split to a benchmark generated before it existed; its other files stay as they are.

    The seed, scene spec and canvas come from the benchmark's marker, so the split is the one `generate` would have
    written with the same arguments.

    Raises:
        FileNotFoundError: `root` holds no generated benchmark (no marker).
        ValueError: `seed` is given and differs from the benchmark's.
    """
    root = Path(root)
    marker_file = root / MARKER
    if not marker_file.is_file():
        raise FileNotFoundError(f"{root} holds no {MARKER}: generate the benchmark there first")
    marker = json.loads(marker_file.read_text())
    if seed is not None and seed != marker["seed"]:
        raise ValueError(
            f"{root} was generated with seed {marker['seed']}, not {seed}; the binding split uses its seed"
        )
    return write_binding(
        root, count, marker["seed"], spec_from_dict(marker["spec"]), marker["canvas"], workers, show_progress
    )


def spec_from_dict(saved: dict[str, Any]) -> SceneSpec:
    """The SceneSpec a marker's `spec` records (JSON lists back to tuples)."""

    def frozen(value: Any) -> Any:
        return tuple(frozen(item) for item in value) if isinstance(value, list) else value

    return SceneSpec(**{key: frozen(value) for key, value in saved.items()})


__all__ = [
    "BINDING_DIR",
    "BINDING_FILE",
    "BINDING_KINDS",
    "BINDING_SPLIT",
    "DEFAULT_BINDING_TRIPLETS",
    "BindingContent",
    "HardNegative",
    "add_binding",
    "binding_scene",
    "build_binding",
    "remove_binding",
    "write_binding",
]
