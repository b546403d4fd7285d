"""Tiny raw datasets on disk for the source readers and the shard builder: CIRR layout, LaSCo JSON, JSONL manifest,
and the released layouts of CIRR_R, Hotel-CIR and FashionIQ.

Images are small solid-colour PNGs, each triplet with its own pair, so damaging one image affects one triplet.
Every caption gets a PTB tree in a `trees.jsonl` sidecar.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

COLORS = ("red", "green", "blue", "yellow", "white", "black", "purple", "orange", "pink", "brown")
SHAPES = ("cube", "ball", "cone", "ring")
_RGB = {
    "red": (200, 30, 30),
    "green": (30, 180, 60),
    "blue": (40, 60, 200),
    "yellow": (220, 210, 40),
    "white": (240, 240, 240),
    "black": (15, 15, 15),
    "purple": (130, 40, 160),
    "orange": (240, 140, 20),
    "pink": (240, 150, 190),
    "brown": (120, 70, 30),
}


def caption_and_tree(number: int) -> tuple[str, str]:
    """A caption "replace the <c> <s> with a <c'> <s'>" and its PTB tree."""
    color, other = COLORS[number % len(COLORS)], COLORS[(number + 3) % len(COLORS)]
    shape, other_shape = SHAPES[number % len(SHAPES)], SHAPES[(number + 1) % len(SHAPES)]
    caption = f"replace the {color} {shape} with a {other} {other_shape}"
    tree = (
        f"(ROOT (S (VP (VB replace) (NP (DT the) (JJ {color}) (NN {shape})) "
        f"(PP (IN with) (NP (DT a) (JJ {other}) (NN {other_shape}))))))"
    )
    return caption, tree


def write_image(path: Path, number: int, size: tuple[int, int] = (24, 16)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, _RGB[COLORS[number % len(COLORS)]]).save(path, format="PNG")


def write_cirr(root: Path, count: int, split: str = "train", with_targets: bool = True) -> list[dict]:
    """A CIRR-layout dataset with `count` caption entries under `root`; returns the caption entries."""
    images: dict[str, str] = {}
    entries = []
    trees = []
    for number in range(count):
        reference, target = f"{split}-{number}-0-img0", f"{split}-{number}-1-img0"
        for offset, name in enumerate((reference, target)):
            relative = f"./{split}/{number % 3}/{name}.png"
            images[name] = relative
            write_image(root / relative, number + offset)
        caption, tree = caption_and_tree(number)
        entry = {
            "pairid": 100 + number,
            "reference": reference,
            "caption": caption,
            "img_set": {"id": number, "members": [reference, target], "reference_rank": 0, "target_rank": 1},
        }
        if with_targets:
            entry.update(target_hard=target, target_soft={target: 1.0})
        entries.append(entry)
        trees.append({"caption": caption, "tree": tree})
    (root / "cirr" / "captions").mkdir(parents=True, exist_ok=True)
    (root / "cirr" / "image_splits").mkdir(parents=True, exist_ok=True)
    (root / "cirr" / "captions" / f"cap.rc2.{split}.json").write_text(json.dumps(entries))
    (root / "cirr" / "image_splits" / f"split.rc2.{split}.json").write_text(json.dumps(images))
    with (root / "trees.jsonl").open("a") as handle:
        for line in trees:
            handle.write(json.dumps(line) + "\n")
    return entries


def write_lasco(path: Path, image_root: Path, count: int) -> list[dict]:
    """`lasco_train.json` with COCO-style image paths under `image_root`, plus its trees sidecar next to it."""
    entries = []
    with (path.parent / "lasco_trees.jsonl").open("w") as trees:
        for number in range(count):
            reference, target = f"train2014/COCO_train2014_{number:012d}.jpg", f"train2014/COCO_t_{number:012d}.jpg"
            write_image(image_root / reference, number)
            write_image(image_root / target, number + 5)
            caption, tree = caption_and_tree(number + 20)
            entries.append(
                {"qid": 7000 + number, "query-image": [number, reference], "query-text": caption,
                 "target-image": [number + 1, target]}
            )  # fmt: skip
            trees.write(json.dumps({"caption": caption, "tree": tree}) + "\n")
    path.write_text(json.dumps(entries))
    return entries


def write_manifest(path: Path, count: int) -> list[dict]:
    """A JSONL manifest with images in `images/` next to it, plus its trees sidecar."""
    lines = []
    with (path.parent / "manifest_trees.jsonl").open("w") as trees:
        for number in range(count):
            reference, target = f"images/m{number}_ref.png", f"images/m{number}_tgt.png"
            write_image(path.parent / reference, number + 2)
            write_image(path.parent / target, number + 7)
            caption, tree = caption_and_tree(number + 40)
            lines.append({"id": f"m{number}", "reference": reference, "target": target, "caption": caption})
            trees.write(json.dumps({"caption": caption, "tree": tree}) + "\n")
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return lines


def _write_trees(path: Path, captions_and_trees: list[tuple[str, str]]) -> None:
    with path.open("a") as handle:
        for caption, tree in captions_and_trees:
            handle.write(json.dumps({"caption": caption, "tree": tree}) + "\n")


def write_cirr_r(root: Path, cirr_root: Path, count: int, captions_per_pair: int = 2) -> list[dict]:
    """CIRR_R as released: `root/rewritten_captions/rewritten_train.json` over a CIRR layout written at `cirr_root`.

    Entry i rewrites CIRR pair i; its image urls end in the CIRR image names (`.../train-3-0-img0.png`), as the
    release's do. Every difference caption gets a tree in `root/cirr_r_trees.jsonl`.
    """
    cirr_entries = write_cirr(cirr_root, count)
    entries, trees = [], []
    for number, cirr_entry in enumerate(cirr_entries):
        captions = []
        for offset in range(captions_per_pair):
            caption, tree = caption_and_tree(60 + 2 * number + offset)
            captions.append(caption)
            trees.append((caption, tree))
        entries.append(
            {
                "query_image_url": f"https://images.example/cirr/train/{cirr_entry['reference']}.png",
                "retrieved_image_url": f"https://images.example/cirr/train/{cirr_entry['target_hard']}.png",
                "difference_captions": captions,
            }
        )
    (root / "rewritten_captions").mkdir(parents=True, exist_ok=True)
    (root / "rewritten_captions" / "rewritten_train.json").write_text(json.dumps(entries))
    _write_trees(root / "cirr_r_trees.jsonl", trees)
    return entries


def write_hotel_cir(root: Path, count: int, split: str = "train") -> list[dict]:
    """Hotel-CIR as released: `root/captions/hotel_{split}_data.json`, images under `root/images/{train,val_test}/`.

    Image urls end in `<chain>/<hotel>/<image>.png`, the three components the images are stored under. Trees go
    to `root/hotel_trees.jsonl`.
    """
    image_dir = root / "images" / ("train" if split == "train" else "val_test")
    entries, trees = [], []
    for number in range(count):
        hotel = f"{number % 2}/{100 + number}"
        urls = {kind: f"https://hotels.example/~data/{hotel}/{kind}_{number}.png" for kind in ("q", "r", "d")}
        write_image(image_dir / hotel / f"q_{number}.png", number + 1)
        write_image(image_dir / hotel / f"r_{number}.png", number + 4)
        caption, tree = caption_and_tree(80 + number)
        entries.append(
            {"query_image": urls["q"], "result_image": urls["r"], "difference": caption, "distractors": [urls["d"]]}
        )
        trees.append((caption, tree))
    (root / "captions").mkdir(parents=True, exist_ok=True)
    (root / "captions" / f"hotel_{split}_data.json").write_text(json.dumps(entries))
    _write_trees(root / "hotel_trees.jsonl", trees)
    return entries


def write_fashioniq(root: Path, count: int, category: str = "dress", split: str = "train") -> list[dict]:
    """FashionIQ's layout: `root/captions/cap.{category}.{split}.json` and `root/images/<name>.png`.

    The two captions of entry i are two fixture captions; the tree of their benchmark join ("Replace ... and
    replace ...") goes to `root/fashioniq_trees.jsonl` as three trees (first caption, "and", second caption).
    """
    entries, trees = [], []
    for number in range(count):
        candidate, target = f"{category}{number}a", f"{category}{number}b"
        write_image(root / "images" / f"{candidate}.png", number + 2)
        write_image(root / "images" / f"{target}.png", number + 6)
        (first, first_tree), (second, second_tree) = caption_and_tree(100 + number), caption_and_tree(110 + number)
        entries.append({"candidate": candidate, "target": target, "captions": [first + ".", " " + second]})
        joined = f"{first.capitalize()} and {second}"
        joined_tree = f"{first_tree.replace('(VB replace)', '(VB Replace)', 1)} (ROOT (X (CC and))) {second_tree}"
        trees.append((joined, joined_tree))
    (root / "captions").mkdir(parents=True, exist_ok=True)
    (root / "captions" / f"cap.{category}.{split}.json").write_text(json.dumps(entries))
    _write_trees(root / "fashioniq_trees.jsonl", trees)
    return entries
