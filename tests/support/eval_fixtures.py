"""Tiny on-disk benchmarks in each public layout (CIRR, CIRCO, FashionIQ, PatternCIR, synthetic), checkpoints laid
out as the trainer lays them (ConText, phi, TisCIR), and the eval script's main, for eval tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

MEMBERS = 6


def write_image(path: Path, seed: int, size: tuple[int, int] = (64, 64), box: tuple | None = None) -> None:
    """A plain image of a seeded colour, optionally with a contrasting rectangle at `box` (fractions)."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    if box is not None:
        width, height = size
        x0, y0, x1, y1 = box
        ImageDraw.Draw(image).rectangle(
            [x0 * width, y0 * height, x1 * width - 1, y1 * height - 1], fill=tuple(rng.randrange(256) for _ in range(3))
        )
    image.save(path)


def write_cirr_layout(
    root: Path, split: str, folder: str, sets: int = 2, labelled: bool = True, seed: int = 0, boxes: bool = False
) -> list[dict]:
    """CIRR's layout: `sets` image sets of 6 members, two pairs per set (member 0 -> 1 and member 2 -> 3).

    Returns:
        The caption entries written to `cirr/captions/cap.rc2.{split}.json`.
    """
    listing, entries = {}, []
    for set_index in range(sets):
        names = [f"{folder}-{set_index}-{member}-img{member}" for member in range(MEMBERS)]
        for member, name in enumerate(names):
            listing[name] = f"./{folder}/{name}.png"
            box = (0.25, 0.25, 0.75, 0.75) if boxes else None
            write_image(root / folder / f"{name}.png", seed * 1000 + set_index * 10 + member, box=box)
        for pair, (reference, target) in enumerate(((0, 1), (2, 3))):
            entry = {
                "pairid": set_index * 2 + pair,
                "reference": names[reference],
                "caption": f"make the shape in set {set_index} look like member {target}",
                "img_set": {"id": set_index, "members": names, "reference_rank": reference},
            }
            if labelled:
                entry.update(target_hard=names[target], target_soft={names[target]: 1.0})
                entry["img_set"]["target_rank"] = target
            entries.append(entry)
    (root / "cirr" / "captions").mkdir(parents=True, exist_ok=True)
    (root / "cirr" / "image_splits").mkdir(parents=True, exist_ok=True)
    (root / "cirr" / "captions" / f"cap.rc2.{split}.json").write_text(json.dumps(entries))
    (root / "cirr" / "image_splits" / f"split.rc2.{split}.json").write_text(json.dumps(listing))
    return entries


def write_circo(root: Path, gallery: int = 8, labelled_queries: int = 3, test_queries: int = 2) -> None:
    """CIRCO's layout: a COCO-unlabeled image_info of `gallery` ids (100, 101, ...), val and test annotations."""
    ids = [100 + index for index in range(gallery)]
    info = {"images": [{"id": image_id, "file_name": f"{image_id:012d}.jpg"} for image_id in ids]}
    folder = root / "COCO2017_unlabeled"
    (folder / "annotations").mkdir(parents=True, exist_ok=True)
    (folder / "annotations" / "image_info_unlabeled2017.json").write_text(json.dumps(info))
    for index, image_id in enumerate(ids):
        write_image(folder / "unlabeled2017" / f"{image_id:012d}.jpg", 500 + index)
    val = [
        {
            "id": query,
            "reference_img_id": ids[query],
            "target_img_id": ids[query + 1],
            "relative_caption": f"has {query + 2} dogs",
            "shared_concept": "shows an animal",
            "gt_img_ids": [ids[query + 1], ids[-1]],
        }
        for query in range(labelled_queries)
    ]
    test = [
        {"id": query, "reference_img_id": ids[query], "relative_caption": "is at night", "shared_concept": "a street"}
        for query in range(test_queries)
    ]
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / "val.json").write_text(json.dumps(val))
    (root / "annotations" / "test.json").write_text(json.dumps(test))


def write_fashioniq(root: Path, categories: tuple[str, ...] = ("dress", "shirt", "toptee"), gallery: int = 5) -> None:
    """FashionIQ's layout: per category a val gallery of `gallery` images and two queries."""
    for offset, category in enumerate(categories):
        names = [f"{category}{index:03d}" for index in range(gallery)]
        for index, name in enumerate(names):
            write_image(root / "images" / f"{name}.png", 700 + offset * 50 + index)
        captions = [
            {"target": names[1], "candidate": names[0], "captions": ["is darker.", "has longer sleeves?"]},
            {"target": names[3], "candidate": names[2], "captions": ["Is RED", " more fitted, "]},
        ]
        (root / "captions").mkdir(parents=True, exist_ok=True)
        (root / "image_splits").mkdir(parents=True, exist_ok=True)
        (root / "captions" / f"cap.{category}.val.json").write_text(json.dumps(captions))
        (root / "image_splits" / f"split.{category}.val.json").write_text(json.dumps(names))


SYNTHETIC_KINDS = ("present", "position", "added", "other")
"""The kinds of the grounded NPs `write_synthetic` lists per query, in order (the box-less `other` NP and the NP
about the target image are not grounded)."""


def write_synthetic(root: Path, sets: int = 2, split: str = "val") -> list[dict]:
    """The synthetic benchmark's layout: CIRR (images under dev/) plus objects.json with boxes and grounded NPs.

    Each caption ("make the shape in set S look like member T") lists an NP of every kind: "the shape" names the
    reference's object (`present`, no `kind` field, as older files have it), "set S" a cell (`position`, top left
    quadrant), "member T" an object to add (`added`, bottom right quadrant), "the shape in set S" something else
    grounded on the object (`other`), "the shape" again as an `other` NP without a box, and "member" about the target.
    """
    entries = write_cirr_layout(root, split, "dev", sets=sets, seed=3, boxes=True)
    listing = json.loads((root / "cirr" / "image_splits" / f"split.rc2.{split}.json").read_text())
    images = {name: {"objects": [{"id": "o0", "box": [0.25, 0.25, 0.75, 0.75], "shape": "square"}]} for name in listing}
    captions = {}
    for entry in entries:
        set_index, target = entry["img_set"]["id"], entry["img_set"]["members"].index(entry["target_hard"])
        captions[str(entry["pairid"])] = [
            {"np": "the shape", "object": "o0", "image": "reference"},
            {"np": f"set {set_index}", "kind": "position", "box": [0.0, 0.0, 0.5, 0.5], "image": "reference"},
            {"np": f"member {target}", "kind": "added", "box": [0.5, 0.5, 1.0, 1.0], "image": "reference"},
            {"np": f"the shape in set {set_index}", "kind": "other", "object": "o0", "box": [0.25, 0.25, 0.75, 0.75]},
            {"np": "the shape", "kind": "other", "object": None, "box": None, "image": "reference"},
            {"np": "member", "object": "o9", "image": "target"},
        ]
    (root / "objects.json").write_text(json.dumps({"images": images, "captions": {split: captions}}))
    return entries


def write_checkpoint(run_dir: Path, step: int, config, complete: bool = True, seed: int = 0) -> Path:
    """A checkpoint as the trainer lays it out: ContextTiny weights, the saved config, trainer state, COMPLETE last."""
    import torch

    from training.checkpoint import layout
    from training.config_loader import to_yaml
    from training.model.context_cir import build_model
    from training.model.weights import save_model_weights

    torch.manual_seed(seed + step)
    path = layout.checkpoint_dir(run_dir, step)
    path.mkdir(parents=True, exist_ok=True)
    save_model_weights(build_model(config.model), path / layout.WEIGHTS)
    (path / layout.CONFIG).write_text(to_yaml(config))
    (path / layout.TRAINER_STATE).write_text(json.dumps({"train": {"step": step}}))  # as Checkpointer.save writes it
    if complete:
        layout.mark_complete(path)
        layout.update_latest_pointer(run_dir, step)
    return path


def write_method_checkpoint(run_dir: Path, step: int, config, seed: int = 0) -> Path:
    """A complete checkpoint of the network `config.train.objective` (phi or tiscir) trains, random heads."""
    import torch

    from training.checkpoint import layout
    from training.config_loader import to_yaml
    from training.model.weights import save_model_weights
    from training.zeroshot.networks import build_method_objective

    torch.manual_seed(seed + step)
    path = layout.checkpoint_dir(run_dir, step)
    path.mkdir(parents=True, exist_ok=True)
    network = build_method_objective(config.train.objective, config.model, config.methods).model
    save_model_weights(network, path / layout.WEIGHTS)
    (path / layout.CONFIG).write_text(to_yaml(config))
    (path / layout.TRAINER_STATE).write_text(json.dumps({"train": {"step": step}}))  # as Checkpointer.save writes it
    layout.mark_complete(path)
    layout.update_latest_pointer(run_dir, step)
    return path


def eval_main():
    """`launch/eval.py`'s main, loaded from the script as a user runs it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "launch_eval", Path(__file__).resolve().parents[2] / "launch" / "eval.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main
