"""The synthetic benchmark: CIRR layout, image sets, trees, object boxes, determinism, CLI."""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path

import pytest
from PIL import Image
from stanza.models.constituency.tree_reader import read_trees

from launch import make_synthetic
from shards.synthetic import MARKER, SceneSpec, generate
from shards.synthetic.render import PALETTE
from shards.synthetic.scenes import apply_edits, propose_edit_pool, random_scene
from shards.synthetic.sets import SplitPlan, build_split

SPLITS = ("train", "val", "test1")
IMAGE_DIR = {"train": "train", "val": "dev", "test1": "test1"}
SIZES = {"n_train": 30, "n_val": 12, "n_test": 6}


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    generate(root, seed=3, **SIZES)
    return root


def load(root: Path, split: str) -> tuple[list[dict], dict[str, str]]:
    captions = json.loads((root / "cirr" / "captions" / f"cap.rc2.{split}.json").read_text())
    image_split = json.loads((root / "cirr" / "image_splits" / f"split.rc2.{split}.json").read_text())
    return captions, image_split


def file_hashes(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def pixels(root: Path, relative_path: str) -> bytes:
    with Image.open(root / relative_path) as image:
        return image.convert("RGB").tobytes()


def test_caption_entries_follow_cirr(bench):
    counts = {"train": SIZES["n_train"], "val": SIZES["n_val"], "test1": SIZES["n_test"]}
    for split in SPLITS:
        captions, image_split = load(bench, split)
        assert len(captions) == counts[split]
        assert len({entry["pairid"] for entry in captions}) == len(captions)
        for entry in captions:
            assert isinstance(entry["pairid"], int) and entry["caption"]
            keys = {"pairid", "reference", "caption", "img_set"}
            if split == "test1":
                assert set(entry) == keys and set(entry["img_set"]) == {"id", "members", "reference_rank"}
            else:
                assert set(entry) == keys | {"target_hard", "target_soft"}
                assert entry["target_soft"] == {entry["target_hard"]: 1.0}
                assert set(entry["img_set"]) == {"id", "members", "reference_rank", "target_rank"}


def test_every_image_name_resolves_to_a_file(bench):
    all_names: set[str] = set()
    for split in SPLITS:
        captions, image_split = load(bench, split)
        assert not all_names & set(image_split), "image names must be unique across splits"
        all_names |= set(image_split)
        pattern = rf"\./{IMAGE_DIR[split]}/" + (r"\d+/" if split == "train" else "")
        for name, relative_path in image_split.items():
            assert name.startswith(f"{IMAGE_DIR[split]}-") and "." not in name
            assert re.fullmatch(pattern + re.escape(name) + r"\.png", relative_path), relative_path
            assert (bench / relative_path).is_file()
        for entry in captions:
            named = [entry["reference"], *entry["img_set"]["members"], entry.get("target_hard", entry["reference"])]
            assert set(named) <= set(image_split)


def test_image_sets_hold_reference_target_and_five_distinct_edits(bench):
    for split in SPLITS:
        captions, image_split = load(bench, split)
        for entry in captions:
            image_set = entry["img_set"]
            members = image_set["members"]
            assert len(members) == 6 and len(set(members)) == 6
            assert members[image_set["reference_rank"]] == entry["reference"]
            if split != "test1":
                assert members[image_set["target_rank"]] == entry["target_hard"] != entry["reference"]
            others = [pixels(bench, image_split[name]) for name in members if name != entry["reference"]]
            assert len(set(others)) == 5, "the five edited members must be distinct images"
            assert pixels(bench, image_split[entry["reference"]]) not in others


def test_each_edited_member_is_the_target_once_so_image_similarity_scores_chance(bench):
    for split in ("train", "val"):
        captions, _ = load(bench, split)
        targets_by_set: dict[int, list[str]] = {}
        members_by_set: dict[int, set[str]] = {}
        for entry in captions:
            targets_by_set.setdefault(entry["img_set"]["id"], []).append(entry["target_hard"])
            members_by_set[entry["img_set"]["id"]] = set(entry["img_set"]["members"]) - {entry["reference"]}
        complete = [set_id for set_id, targets in targets_by_set.items() if len(targets) == 5]
        assert complete, "the fixture should hold at least one complete set"
        for set_id in complete:
            assert sorted(targets_by_set[set_id]) == sorted(members_by_set[set_id])


def test_no_two_images_of_a_split_look_alike(bench):
    for split in SPLITS:
        _, image_split = load(bench, split)
        images = [pixels(bench, path) for path in image_split.values()]
        assert len(set(images)) == len(images)


def test_every_caption_has_a_tree_whose_leaves_are_the_caption(bench):
    lines = [json.loads(line) for line in (bench / "trees.jsonl").read_text().splitlines()]
    captions = [entry["caption"] for split in SPLITS for entry in load(bench, split)[0]]
    assert [line["caption"] for line in lines] == captions
    trees = read_trees("\n".join(line["tree"] for line in lines), use_tqdm=False)
    assert len(trees) == len(lines)
    tree_of: dict[str, str] = {}
    for line, tree in zip(lines, trees):
        assert tree.label == "ROOT"
        assert " ".join(tree.leaf_labels()) == line["caption"]
        assert tree_of.setdefault(line["caption"], line["tree"]) == line["tree"], "one caption, one tree"


def noun_phrases(tree) -> list[str]:
    found = [" ".join(tree.leaf_labels())] if tree.label == "NP" else []
    for child in tree.children:
        if not child.is_leaf():
            found.extend(noun_phrases(child))
    return found


def test_objects_boxes_and_np_links(bench):
    objects = json.loads((bench / "objects.json").read_text())
    trees = {
        line["caption"]: line["tree"] for line in map(json.loads, (bench / "trees.jsonl").read_text().splitlines())
    }
    for split in SPLITS:
        captions, image_split = load(bench, split)
        assert set(image_split) <= set(objects["images"])
        for name, relative_path in image_split.items():
            record = objects["images"][name]
            with Image.open(bench / relative_path) as image:
                assert list(image.size) == record["size"]
                rgb = image.convert("RGB")
                for obj in record["objects"]:
                    x0, y0, x1, y1 = obj["box"]
                    assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
                    # every shape covers its box centre, so the box must sit on the drawn object
                    centre = (int((x0 + x1) / 2 * rgb.width), int((y0 + y1) / 2 * rgb.height))
                    assert rgb.getpixel(centre) == PALETTE[obj["color"]], (name, obj)
        links = objects["captions"][split]
        assert set(links) == {str(entry["pairid"]) for entry in captions}
        for entry in captions:
            reference_objects = {obj["id"]: obj for obj in objects["images"][entry["reference"]]["objects"]}
            tree_nps = noun_phrases(read_trees(trees[entry["caption"]], use_tqdm=False)[0])
            for link in links[str(entry["pairid"])]:
                assert link["image"] == "reference" and link["np"] in tree_nps
                start = link["char_start"]
                assert entry["caption"][start : start + len(link["np"])] == link["np"]
                assert start == 0 or entry["caption"][start - 1] == " "
                if link["kind"] != "present":  # an added object, a place, "the colour (of ...)": no unique name
                    assert link["kind"] in ("added", "position", "other")
                    if link["object"] is not None:
                        assert link["box"] == reference_objects[link["object"]]["box"]
                    continue
                named = reference_objects[link["object"]]
                assert link["box"] == named["box"]
                assert link["np"].split()[-1] == named["shape"]
                # the mention names its object uniquely in the reference
                same = [o for o in reference_objects.values() if all(w in o.values() for w in link["np"].split()[1:])]
                assert same == [named], (entry["caption"], link)


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    small = {"n_train": 10, "n_val": 4, "n_test": 2}
    generate(tmp_path / "a", seed=7, **small)
    generate(tmp_path / "b", seed=7, workers=2, **small)
    generate(tmp_path / "c", seed=8, **small)
    first, second, other = (file_hashes(tmp_path / name) for name in "abc")
    assert first == second
    assert first != other


def test_refuses_a_foreign_directory_and_replaces_its_own(tmp_path):
    foreign = tmp_path / "cirr_download"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not a synthetic benchmark"):
        generate(foreign, n_train=2, n_val=2, n_test=2)
    assert (foreign / "keep.txt").read_text() == "user data"
    ours = tmp_path / "ours"
    generate(ours, n_train=20, n_val=2, n_test=2)
    generate(ours, n_train=5, n_val=2, n_test=2)
    _, image_split = load(ours, "train")
    assert len(list((ours / "train").rglob("*.png"))) == len(image_split), "stale images of the larger run remain"
    assert json.loads((ours / MARKER).read_text())["triplets"]["train"] == 5


def test_edits_of_a_pool_commute_and_differ():
    rng = random.Random(0)
    spec = SceneSpec()
    for _ in range(200):
        scene = random_scene(rng, spec)
        pool = propose_edit_pool(rng, scene, spec, 4)
        forward, backward = apply_edits(scene, pool), apply_edits(scene, pool[::-1])
        assert forward.canonical() == backward.canonical()
        assert len({(o.color, o.shape) for o in forward.objects}) == len(forward.objects) >= 1
        singles = {apply_edits(scene, [edit]).canonical() for edit in pool}
        assert len(singles) == 4 and scene.canonical() not in singles


def test_targets_match_their_captions():
    """A caption's mentioned objects are changed in the target; objects it does not mention are untouched."""
    content = build_split("val", SplitPlan(60, 2), seed=1, spec=SceneSpec())
    scenes = {image.name: image.scene for image in content.images}
    for triplet in content.triplets:
        reference, target = scenes[triplet.reference], scenes[triplet.target]
        mentioned = {mention.object_id for mention in triplet.caption.mentions if mention.kind == "present"}
        before = {o.id: o for o in reference.objects}
        after = {o.id: o for o in target.objects}
        for object_id in mentioned:
            assert after.get(object_id) != before[object_id], triplet.caption.text
        for object_id in before.keys() - mentioned:
            assert after[object_id] == before[object_id], triplet.caption.text


def test_cli_writes_the_layout_and_prints_a_summary(tmp_path, capsys):
    out = tmp_path / "bench"
    argv = ["--out", str(out), "--seed", "1", "--train", "6", "--val", "2", "--test", "2", "--binding", "4"]
    assert make_synthetic.main(argv) == 0
    printed = capsys.readouterr().out
    assert "train: 6 triplets" in printed and "binding: 4 triplets / 1 sets / 6 images" in printed
    assert all((out / "cirr" / "captions" / f"cap.rc2.{split}.json").is_file() for split in SPLITS)
    assert make_synthetic.main(["--out", str(out), "--train", "-1"]) == 2
    assert make_synthetic.main(["--out", str(out), "--binding", "-1"]) == 2


def test_unknown_attribute_names_are_refused_before_writing(tmp_path):
    with pytest.raises(ValueError, match=r"SceneSpec.colors: unknown \['pink'\]"):
        generate(tmp_path / "bench", n_train=2, n_val=2, n_test=2, spec=SceneSpec(colors=("red", "pink", "blue")))
    assert not (tmp_path / "bench").exists()
