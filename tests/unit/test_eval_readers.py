"""Benchmark readers on small fixture files in each public layout; missing files give errors naming the path."""

from __future__ import annotations

import json

import pytest
from eval_fixtures import write_circo, write_cirr_layout, write_fashioniq, write_synthetic

from training.evaluation.benchmarks import BENCHMARKS, BenchmarkError
from training.evaluation.benchmarks.circo import read_circo
from training.evaluation.benchmarks.cirr import read_cirr
from training.evaluation.benchmarks.fashioniq import read_fashioniq
from training.evaluation.benchmarks.patterncir import read_patterncir
from training.evaluation.benchmarks.synthetic import read_synthetic
from training.evaluation.config import EvalConfig


def test_cirr_val_and_test1(tmp_path) -> None:
    write_cirr_layout(tmp_path, "val", "dev", sets=2)
    write_cirr_layout(tmp_path, "test1", "test1", sets=1, labelled=False)
    val = read_cirr(tmp_path, "val")
    assert (val.name, val.split, len(val.queries), len(val.gallery)) == ("cirr", "val", 4, 12)
    first = val.queries[0]
    assert (first.query_id, first.reference, first.target) == ("0", "dev-0-0-img0", "dev-0-1-img1")
    assert first.subset == tuple(f"dev-0-{m}-img{m}" for m in range(6))
    assert val.image_paths["dev-1-3-img3"] == tmp_path / "dev" / "dev-1-3-img3.png"
    assert val.labelled and val.protocol.remove_reference and val.protocol.subset_ks == (1, 2, 3)
    assert val.version["queries"] == 4 and len(val.version["captions_sha256"]) == 64
    test = read_cirr(tmp_path, "test1")
    assert not test.labelled and test.queries[1].target is None


def test_cirr_missing_files_name_the_path(tmp_path) -> None:
    with pytest.raises(BenchmarkError, match=r"cap\.rc2\.val\.json"):
        read_cirr(tmp_path, "val")
    write_cirr_layout(tmp_path, "val", "dev", sets=1)
    (tmp_path / "dev" / "dev-0-4-img4.png").unlink()
    with pytest.raises(BenchmarkError, match=r"dev-0-4-img4\.png"):
        read_cirr(tmp_path, "val")


def test_cirr_entry_naming_an_unlisted_image_is_an_error(tmp_path) -> None:
    entries = write_cirr_layout(tmp_path, "val", "dev", sets=1)
    entries[1]["target_hard"] = "dev-9-9-img9"
    (tmp_path / "cirr" / "captions" / "cap.rc2.val.json").write_text(json.dumps(entries))
    with pytest.raises(BenchmarkError, match=r"pairid 1.*dev-9-9-img9"):
        read_cirr(tmp_path, "val")


def test_circo_val_and_test(tmp_path) -> None:
    write_circo(tmp_path, gallery=8, labelled_queries=3, test_queries=2)
    val = read_circo(tmp_path, "val", "Find a picture that also {shared_concept}, but {relative_caption}.")
    assert val.gallery == [str(100 + index) for index in range(8)]
    assert val.queries[0].text == "Find a picture that also shows an animal, but has 2 dogs."
    assert (val.queries[0].reference, val.queries[0].target, val.queries[0].ground_truth) == (
        "100",
        "101",
        ("101", "107"),
    )
    assert not val.protocol.remove_reference and val.protocol.map_ks == (5, 10, 25, 50)
    assert val.image_paths["103"].name == "000000000103.jpg"
    test = read_circo(tmp_path, "test")
    assert not test.labelled and [query.query_id for query in test.queries] == ["0", "1"]
    with pytest.raises(BenchmarkError, match="eval.datasets.circo.template"):
        read_circo(tmp_path, "val", "{shared_concept} {color}")


def test_circo_missing_files_name_the_path(tmp_path) -> None:
    write_circo(tmp_path)
    (tmp_path / "COCO2017_unlabeled" / "unlabeled2017" / "000000000105.jpg").unlink()
    with pytest.raises(BenchmarkError, match=r"000000000105\.jpg"):
        read_circo(tmp_path, "val")
    (tmp_path / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json").unlink()
    with pytest.raises(BenchmarkError, match=r"image_info_unlabeled2017\.json"):
        read_circo(tmp_path, "val")


def test_fashioniq_categories(tmp_path) -> None:
    write_fashioniq(tmp_path, categories=("dress", "shirt"))
    dress = read_fashioniq(tmp_path, "dress")
    assert dress.name == "fashioniq/dress" and dress.gallery == [f"dress{index:03d}" for index in range(5)]
    assert [query.text for query in dress.queries] == [
        "Is darker and has longer sleeves",
        "Is red and more fitted",
    ]
    assert dress.queries[0].reference == "dress000" and dress.queries[0].target == "dress001"
    assert not dress.protocol.remove_reference and dress.protocol.recall_ks == (10, 50)
    with pytest.raises(BenchmarkError, match=r"cap\.toptee\.val\.json"):
        read_fashioniq(tmp_path, "toptee")
    (tmp_path / "images" / "shirt002.png").unlink()
    with pytest.raises(BenchmarkError, match=r"shirt002\.png"):
        read_fashioniq(tmp_path, "shirt")


def test_patterncir_needs_a_labelled_split(tmp_path) -> None:
    write_cirr_layout(tmp_path, "test1", "test1", sets=1)
    split = read_patterncir(tmp_path, "test1")
    assert split.name == "patterncir" and split.protocol.recall_ks == (1, 5, 10, 20, 50) and split.labelled
    write_cirr_layout(tmp_path, "val", "dev", sets=1, labelled=False)
    with pytest.raises(BenchmarkError, match=r"cap\.rc2\.val\.json.*no target_hard"):
        read_patterncir(tmp_path, "val")


def test_synthetic_grounded_phrases(tmp_path) -> None:
    write_synthetic(tmp_path, sets=1)
    split = read_synthetic(tmp_path, "val")
    # Per query four NPs with a box; the box-less `other` NP and the NP about the target image are left out.
    assert split.protocol.grounding and split.version["grounded_phrases"] == 8
    assert split.version["phrases_without_box"] == 2
    # A present NP carries its object's box, the others the box their entry gives.
    assert [(phrase.text, phrase.kind, phrase.box) for phrase in split.queries[0].phrases] == [
        ("the shape", "present", (0.25, 0.25, 0.75, 0.75)),
        ("set 0", "position", (0.0, 0.0, 0.5, 0.5)),
        ("member 1", "added", (0.5, 0.5, 1.0, 1.0)),
        ("the shape in set 0", "other", (0.25, 0.25, 0.75, 0.75)),
    ]
    objects = json.loads((tmp_path / "objects.json").read_text())
    objects["captions"]["val"]["0"][0]["object"] = "o7"
    (tmp_path / "objects.json").write_text(json.dumps(objects))
    with pytest.raises(BenchmarkError, match=r"captions\.val\.0\[0\] names object 'o7'"):
        read_synthetic(tmp_path, "val")
    objects["captions"]["val"]["0"][0]["object"] = "o0"
    objects["captions"]["val"]["0"][1]["box"] = [0.5, 0.0, 0.2, 1.0]
    (tmp_path / "objects.json").write_text(json.dumps(objects))
    with pytest.raises(BenchmarkError, match=r"captions\.val\.0\[1\] box"):
        read_synthetic(tmp_path, "val")
    (tmp_path / "objects.json").unlink()
    with pytest.raises(BenchmarkError, match=r"objects\.json"):
        read_synthetic(tmp_path, "val")


def test_config_driven_splits(tmp_path) -> None:
    write_cirr_layout(tmp_path / "cirr", "val", "dev", sets=1)
    write_cirr_layout(tmp_path / "cirr", "test1", "test1", sets=1, labelled=False)
    write_fashioniq(tmp_path / "fiq")
    config = EvalConfig(
        benchmarks=["cirr", "fashioniq"],
        datasets={"cirr": {"root": str(tmp_path / "cirr")}, "fashioniq": {"root": str(tmp_path / "fiq")}},
        splits=["val", "test"],
    )

    def splits_of(name: str):
        benchmark = BENCHMARKS.get(name)
        return (
            benchmark.scored_splits(config.dataset(name), config.splits),
            benchmark.submission_split(config.dataset(name), config.splits),
        )

    assert [split.name for split in splits_of("fashioniq")[0]] == [
        "fashioniq/dress",
        "fashioniq/shirt",
        "fashioniq/toptee",
    ]
    assert splits_of("cirr")[1].split == "test1"
    assert splits_of("fashioniq")[1] is None
    assert config.unset_roots(["cirr", "circo", "synthetic"]) == [
        "eval.datasets.circo.root",
        "eval.datasets.synthetic.root",
    ]
    with pytest.raises(BenchmarkError, match="eval.datasets.circo.root"):
        splits_of("circo")
