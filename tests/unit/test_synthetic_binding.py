"""The synthetic benchmark's `binding` split: its queries and hard negatives, its determinism, and that adding it
changes no byte of the other splits' files; the eval's reading of it (and of data generated before it existed)."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from eval_fixtures import write_synthetic

from launch import make_synthetic
from shards.synthetic import add_binding, generate
from shards.synthetic.oracle import SceneOracle
from training.evaluation.benchmarks import BENCHMARKS
from training.evaluation.benchmarks.synthetic import SyntheticSettings, read_binding
from training.evaluation.metrics import target_above_hard_negative

SIZES = {"n_train": 10, "n_val": 4, "n_test": 2}
BINDING = 12
BINDING_FILES = {
    "binding.json",
    "cirr/captions/cap.rc2.binding.json",
    "cirr/image_splits/split.rc2.binding.json",
}
PINNED_SHA256 = {
    "cirr/captions/cap.rc2.test1.json": "d7dd4ed54a39d189fb86550bda3e07269948558a9b015edc47686a4408973db0",
    "cirr/captions/cap.rc2.train.json": "4b9fd8e4d55957aeaa0e322487ba834ecd94a387a08ba80f18a97354a03d4d76",
    "cirr/captions/cap.rc2.val.json": "040c435508c4962ca3df45221ca8f4dba8f14da9d77ccf1613b741077a364cf2",
    "cirr/image_splits/split.rc2.test1.json": "071b1622a95117481baaeb2dc9403f3953bb94c288698677e0753a1da8cb3bbc",
    "cirr/image_splits/split.rc2.train.json": "24715945841f5ad308b8a5d82ba32214e43951c99a2092580643535ab7f7a4cf",
    "cirr/image_splits/split.rc2.val.json": "1230cc8219acc470e923b2a5f164d881be22aaca5d5eaefd3803087d3b16413f",
    "objects.json": "fa4c89c615d56f1cdfcfdd05049cadb1e45264c6f466ffeec3df2ede4352e1d8",
    "pretrain/test1.jsonl": "15e8ee4b271dae303973b3216477e492ccdcb0d12276432b3fa6bd3c487afec6",
    "pretrain/train.jsonl": "876f250021d6310024c74082afcc6938c4e950cecca622ccc6497976b7962c10",
    "pretrain/trees.jsonl": "d6cec9a2aeb5bab4dfde22890b63870a8a70b359401db6f1e8ecac85d749a51c",
    "pretrain/val.jsonl": "71ed01e9de575a1b937484bd99091be14a899efefb00379da425502d79ea989c",
    "synthetic.json": "72754838545bc6199ddff2c5cade515a798acd2155dc8416f7ac0af949371bf0",
    "trees.jsonl": "ab06e37c9b6b452a50fdc5b6f8848809fb7907da5be348595956aab7f1336bad",
}
"""sha256 of every annotation file of `generate(seed=3, **SIZES)` as the generator wrote them before the binding
split existed (commit cae0ffd). PNG bytes are left out: they depend on the zlib build, not on the generator."""


def file_hashes(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    """The same small benchmark without and with the binding split."""
    base = tmp_path_factory.mktemp("binding")
    generate(base / "without", seed=3, **SIZES)
    generate(base / "with", seed=3, n_binding=BINDING, **SIZES)
    return {"without": base / "without", "with": base / "with"}


def test_adding_the_split_changes_no_byte_of_the_other_files(roots, tmp_path):
    without, with_binding = file_hashes(roots["without"]), file_hashes(roots["with"])
    assert {name: with_binding[name] for name in without} == without
    added = set(with_binding) - set(without)
    assert {name for name in added if not name.startswith("binding/")} == BINDING_FILES
    assert len([name for name in added if name.startswith("binding/")]) == BINDING // 4 * 6
    # The annotations are byte for byte what the generator wrote before the binding split existed.
    assert {name: with_binding[name] for name in PINNED_SHA256} == PINNED_SHA256
    # Added to a benchmark generated without it, the split is the same bytes, and nothing else changes.
    later = tmp_path / "later"
    shutil.copytree(roots["without"], later)
    add_binding(later, BINDING, workers=2)
    assert file_hashes(later) == with_binding


def test_the_split_is_deterministic_for_a_seed_and_follows_it(roots, tmp_path):
    generate(tmp_path / "again", seed=3, n_binding=BINDING, workers=2, **SIZES)
    generate(tmp_path / "other", seed=4, n_binding=BINDING, **SIZES)
    first, again, other = (file_hashes(path) for path in (roots["with"], tmp_path / "again", tmp_path / "other"))
    assert again == first
    assert all(other[name] != first[name] for name in ("binding.json", "cirr/captions/cap.rc2.binding.json"))


def _attributes(obj: dict) -> tuple[str, str, str, str]:
    return obj["shape"], obj["color"], obj["size"], obj["position"]


def _objects(sidecar: dict, image: str) -> list[tuple[str, str, str, str]]:
    return sorted(_attributes(obj) for obj in sidecar["images"][image]["objects"])


def _change(reference: list[tuple], edited: list[tuple]) -> tuple[set, set]:
    """(objects gone, objects new) from reference to edited, as attribute tuples."""
    return set(reference) - set(edited), set(edited) - set(reference)


def test_queries_name_one_of_two_same_shape_objects_and_hold_the_wrong_one_edited(roots):
    root = roots["with"]
    captions = json.loads((root / "cirr" / "captions" / "cap.rc2.binding.json").read_text())
    sidecar = json.loads((root / "binding.json").read_text())
    assert len(captions) == BINDING and set(sidecar["hard_negatives"]) == {str(e["pairid"]) for e in captions}
    for entry in captions:
        negative = sidecar["hard_negatives"][str(entry["pairid"])]
        reference = {o["id"]: o for o in sidecar["images"][entry["reference"]]["objects"]}
        named, wrong = reference[negative["edited_object"]], reference[negative["wrong_object"]]
        assert named["shape"] == wrong["shape"] and named["color"] != wrong["color"]
        assert sum(o["shape"] == named["shape"] for o in reference.values()) >= 2
        assert f"{named['color']} {named['shape']}" in entry["caption"]
        assert f"{wrong['color']} {wrong['shape']}" not in entry["caption"]
        members = entry["img_set"]["members"]
        assert negative["image"] in members and entry["target_hard"] in members
        assert len({negative["image"], entry["target_hard"], entry["reference"]}) == 3
        # The target and the hard negative differ only in which of the two objects the one edit changed: each loses
        # its own object and gains, in that object's place, one with the same new attributes (a removal gains none).
        before = _objects(sidecar, entry["reference"])
        gone_target, new_target = _change(before, _objects(sidecar, entry["target_hard"]))
        gone_negative, new_negative = _change(before, _objects(sidecar, negative["image"]))
        assert gone_target == {_attributes(named)} and gone_negative == {_attributes(wrong)}, entry["caption"]
        assert len(new_target) == len(new_negative) == (0 if negative["edit"] == "remove" else 1)
        for gained_target, gained_negative in zip(new_target, new_negative):
            assert gained_target[3] == named["position"] and gained_negative[3] == wrong["position"]
            changed = {i for i in range(3) if gained_target[i] != _attributes(named)[i]}
            changed |= {i for i in range(3) if gained_negative[i] != _attributes(wrong)[i]}
            assert changed and all(gained_target[i] == gained_negative[i] for i in changed), entry["caption"]


def test_cli_adds_the_split_to_an_older_benchmark_and_refuses_another_seed(roots, tmp_path, capsys):
    older = tmp_path / "older"
    shutil.copytree(roots["without"], older)
    assert make_synthetic.main(["--add-binding", "--out", str(older), "--binding", "8", "--seed", "4"]) == 2
    assert "seed 3" in capsys.readouterr().err and not (older / "binding.json").exists()
    assert make_synthetic.main(["--add-binding", "--out", str(older), "--binding", "8", "--workers", "1"]) == 0
    assert "8 triplets" in capsys.readouterr().out
    assert len(json.loads((older / "cirr" / "captions" / "cap.rc2.binding.json").read_text())) == 8
    assert make_synthetic.main(["--add-binding", "--out", str(tmp_path / "nothing")]) == 2


def test_the_scene_oracle_knows_the_binding_images_and_triplets(roots):
    root = roots["with"]
    sidecar = json.loads((root / "binding.json").read_text())
    listing = json.loads((root / "cirr" / "image_splits" / "split.rc2.binding.json").read_text())
    oracle = SceneOracle.from_root(root)
    for name, relative in listing.items():
        assert oracle.scenes[hashlib.sha256((root / relative).read_bytes()).hexdigest()] == sidecar["images"][name]
    binding_targets = {target for target in oracle.cvsi.targets.values() if target.startswith("binding-")}
    assert len(binding_targets) == BINDING


def test_eval_reads_hard_negatives_and_skips_a_missing_split_with_one_warning(roots, tmp_path, caplog):
    split = read_binding(roots["with"])
    assert split.split == "binding" and len(split.queries) == BINDING and split.protocol.hard_negatives
    assert not split.protocol.grounding
    assert all(len(q.hard_negatives) == 1 and q.hard_negatives[0] in q.subset for q in split.queries)
    synthetic = BENCHMARKS.get("synthetic")
    assert [part.split for part in synthetic.diagnostic_splits(SyntheticSettings(root=str(roots["with"])))] == [
        "binding"
    ]
    write_synthetic(tmp_path, sets=1)  # laid out as data generated before the binding split existed
    with caplog.at_level(logging.WARNING):
        assert synthetic.diagnostic_splits(SyntheticSettings(root=str(tmp_path))) == []
        assert synthetic.diagnostic_splits(SyntheticSettings(root=str(roots["with"]), binding=False)) == []
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no binding split" in warnings[0] and "--add-binding" in warnings[0]


def test_target_above_hard_negative_counts_wins_ties_half_and_skips_queries_without_one():
    gallery = torch.eye(4)
    queries = torch.tensor([[0.9, 0.1, 0, 0], [0.2, 0.8, 0, 0], [0, 0, 0.5, 0.5], [1.0, 0, 0, 0]])
    targets = [0, 0, 2, 3]
    # query 0 beats its negative, query 1 loses, query 2 ties, query 3 has none (left out)
    assert target_above_hard_negative(queries, gallery, targets, [[1], [1], [3], []]) == pytest.approx(0.5)
    assert target_above_hard_negative(queries, gallery, targets, [[1, 2], [], [], []]) == pytest.approx(1.0)
    assert target_above_hard_negative(queries, gallery, targets, [[], [], [], []]) == 0.0
