"""Writing a generated benchmark in CIRR's on-disk layout, plus the trees and boxes sidecars.

    <root>/cirr/captions/cap.rc2.{train,val,test1}.json     caption entries
    <root>/cirr/image_splits/split.rc2.{train,val,test1}.json  image name -> ./relative/path.png
    <root>/train/<NN>/*.png  <root>/dev/*.png  <root>/test1/*.png
    <root>/trees.jsonl       {"caption", "tree"} for every caption entry of every split
    <root>/objects.json      image objects with boxes and each image's scene description; every caption NP with
                             what it names (`present` object, `added` object, `position`, `other`) and its box
    <root>/pretrain/{train,val,test1}.jsonl  one line per image: the image, its description and the description's
                             NPs with boxes, as a JSONL shard source (reference = target = the image)
    <root>/pretrain/trees.jsonl  {"caption", "tree"} for every description
    <root>/synthetic.json    what generated it (marks the directory as ours)

Every JSON file is written with sorted keys in a fixed order, so one seed gives the same bytes every time.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from tqdm import tqdm

from shards.synthetic.captions import Mention
from shards.synthetic.descriptions import Description, cell_box, describe
from shards.synthetic.render import object_box, png_bytes, render
from shards.synthetic.scenes import CELL_NAMES, Scene
from shards.synthetic.sets import IMAGE_DIRS, ImageRecord, SplitContent

logger = logging.getLogger(__name__)

MARKER = "synthetic.json"
"""File that marks a directory as a generated benchmark, so regenerating may clear it."""
PRETRAIN_DIR = "pretrain"
OWNED = ("cirr", *sorted(set(IMAGE_DIRS.values())), "trees.jsonl", "objects.json", PRETRAIN_DIR, MARKER)


def prepare_root(root: Path) -> None:
    """Create `root`, or clear a previous generation in it; refuse to touch a directory that is not ours."""
    if root.exists() and any(root.iterdir()) and not (root / MARKER).is_file():
        raise FileExistsError(
            f"{root} is not empty and holds no {MARKER}: it is not a synthetic benchmark; choose an empty --out"
        )
    for name in OWNED:
        path = root / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    root.mkdir(parents=True, exist_ok=True)


def write_json(path: Path, value: Any, compact: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = (
        json.dumps(value, sort_keys=True, separators=(",", ":"))
        if compact
        else json.dumps(value, sort_keys=True, indent=1)
    )
    path.write_text(text + "\n")


def caption_entries(split: str, content: SplitContent) -> list[dict[str, Any]]:
    """CIRR caption entries; test1 entries carry no target."""
    entries = []
    for triplet in content.triplets:
        entry: dict[str, Any] = {
            "pairid": triplet.pairid,
            "reference": triplet.reference,
            "caption": triplet.caption.text,
            "img_set": {
                "id": triplet.set_id,
                "members": list(triplet.members),
                "reference_rank": triplet.members.index(triplet.reference),
            },
        }
        if split != "test1":
            entry["target_hard"] = triplet.target
            entry["target_soft"] = {triplet.target: 1.0}
            entry["img_set"]["target_rank"] = triplet.members.index(triplet.target)
        entries.append(entry)
    return entries


def image_entry(scene: Scene, canvas: int, description: Description) -> dict[str, Any]:
    return {
        "size": [canvas, canvas],
        "background": scene.background,
        "description": description.text,
        "objects": [
            {
                "id": obj.id,
                "shape": obj.shape,
                "color": obj.color,
                "size": obj.size,
                "position": CELL_NAMES[obj.cell],
                "box": [round(v, 4) for v in object_box(obj)],
            }
            for obj in scene.objects
        ],
    }


def mention_entry(mention: Mention, reference: Scene) -> dict[str, Any]:
    """A caption NP for objects.json: text, offset, kind, the reference object it names (if any) and its box.

    The box is the object's in the reference for `present` and `other` NPs about an object, the grid cell for
    `added` and `position` NPs, and None for an NP about no place ("the colour").
    """
    if mention.object_id is not None:
        box = [round(v, 4) for v in object_box(reference.by_id(mention.object_id))]
    elif mention.cell is not None:
        box = [round(v, 4) for v in cell_box(mention.cell)]
    else:
        box = None
    return {
        "np": mention.text,
        "object": mention.object_id,
        "image": "reference",
        "char_start": mention.char_start,
        "kind": mention.kind,
        "box": box,
    }


def pretrain_line(image: ImageRecord, description: Description) -> dict[str, Any]:
    """The image's line of `pretrain/<split>.jsonl` (paths relative to that file)."""
    path = "../" + image.relative_path.removeprefix("./")
    return {
        "id": image.name,
        "reference": path,
        "target": path,
        "caption": description.text,
        "phrases": [
            {"text": phrase.text, "char_start": phrase.char_start, "kind": phrase.kind, "box": list(phrase.box)}
            for phrase in description.phrases
        ],
    }


def write_annotations(root: Path, splits: dict[str, SplitContent], canvas: int, marker: dict[str, Any]) -> None:
    """Caption and split files of every split, trees.jsonl, objects.json, the pretraining manifests, the marker."""
    objects: dict[str, Any] = {"images": {}, "captions": {}}
    (root / PRETRAIN_DIR).mkdir(exist_ok=True)
    with (root / PRETRAIN_DIR / "trees.jsonl").open("w") as description_trees:
        for split, content in splits.items():
            with (root / PRETRAIN_DIR / f"{split}.jsonl").open("w") as manifest:
                for image in content.images:
                    description = describe(image.scene)
                    objects["images"][image.name] = image_entry(image.scene, canvas, description)
                    manifest.write(json.dumps(pretrain_line(image, description), sort_keys=True) + "\n")
                    line = {"caption": description.text, "tree": description.tree}
                    description_trees.write(json.dumps(line, sort_keys=True) + "\n")
    scenes = {image.name: image.scene for content in splits.values() for image in content.images}
    with (root / "trees.jsonl").open("w") as trees:
        for split, content in splits.items():
            write_json(root / "cirr" / "captions" / f"cap.rc2.{split}.json", caption_entries(split, content))
            write_json(
                root / "cirr" / "image_splits" / f"split.rc2.{split}.json",
                {image.name: image.relative_path for image in content.images},
            )
            objects["captions"][split] = {
                str(triplet.pairid): [
                    mention_entry(mention, scenes[triplet.reference]) for mention in triplet.caption.mentions
                ]
                for triplet in content.triplets
            }
            for triplet in content.triplets:
                line = {"caption": triplet.caption.text, "tree": triplet.caption.tree}
                trees.write(json.dumps(line, sort_keys=True) + "\n")
    write_json(root / "objects.json", objects, compact=True)  # one line: it holds every object of every image
    write_json(root / MARKER, marker)


def _render_one(job: tuple[str, Scene, int]) -> None:
    path, scene, canvas = job
    Path(path).write_bytes(png_bytes(render(scene, canvas)))


def write_images(
    root: Path, images: Iterable[ImageRecord], canvas: int, workers: int, show_progress: bool = True
) -> int:
    """Render every image to its CIRR path; `workers` processes (<= 1: in this process). Returns the count."""
    jobs = []
    for image in images:
        path = root / image.relative_path
        path.parent.mkdir(parents=True, exist_ok=True)
        jobs.append((str(path), image.scene, canvas))
    progress = tqdm(total=len(jobs), desc="rendering", unit="img", disable=not show_progress)
    if workers <= 1:
        for job in jobs:
            _render_one(job)
            progress.update()
    else:
        # Each image's bytes depend only on its scene, so the order the workers finish in does not matter.
        with get_context("spawn" if os.name == "nt" else "fork").Pool(workers) as pool:
            for _ in pool.imap_unordered(_render_one, jobs, chunksize=64):
                progress.update()
    progress.close()
    return len(jobs)
