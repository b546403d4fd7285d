"""Readers of the paper's data as released (CIRR_R, Hotel-CIR) and of FashionIQ as a training source."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import pytest
from raw_dataset_fixtures import write_cirr_r, write_fashioniq, write_hotel_cir

from cluster.root_config import load_config
from shards.builder.shard_set import build_shards
from shards.builder.sources import SourceError, read_source
from shards.config import DataConfig, NounPhraseConfig, SourceConfig
from shards.format import split_member_name
from shards.model_inputs import TINY_BACKBONE
from training.config_loader import ConfigError
from training.evaluation.benchmarks.fashioniq import fashioniq_text


def _cirr_r(tmp_path: Path, **options) -> SourceConfig:
    return SourceConfig(
        name="cirr_r", kind="cirr_r", path=str(tmp_path / "cirr_r"), image_root=str(tmp_path / "cirr"), **options
    )


def _rewrite(path: Path, edit) -> None:
    entries = json.loads(path.read_text())
    edit(entries)
    path.write_text(json.dumps(entries))


def test_cirr_r_gives_one_triplet_per_difference_caption_on_cirr_images(tmp_path):
    entries = write_cirr_r(tmp_path / "cirr_r", tmp_path / "cirr", 3)
    triplets = read_source(_cirr_r(tmp_path))
    assert [t.id for t in triplets] == [
        "cirr_r-0-0",
        "cirr_r-0-1",
        "cirr_r-1-0",
        "cirr_r-1-1",
        "cirr_r-2-0",
        "cirr_r-2-1",
    ]
    assert [t.caption for t in triplets[2:4]] == entries[1]["difference_captions"]
    second = triplets[2]
    assert second.reference_name == entries[1]["query_image_url"]
    # The url's file name is the CIRR image name; CIRR's image list places it (`./train/1/...` for pair 1).
    assert second.reference_path == os.path.normpath(tmp_path / "cirr/train/1/train-1-0-img0.png")
    assert second.target_path == os.path.normpath(tmp_path / "cirr/train/1/train-1-1-img0.png")
    assert all(os.path.isfile(t.reference_path) and os.path.isfile(t.target_path) for t in triplets)


def test_cirr_r_joined_mode_makes_one_caption_per_pair(tmp_path):
    write_cirr_r(tmp_path / "cirr_r", tmp_path / "cirr", 2)
    released = tmp_path / "cirr_r/rewritten_captions/rewritten_train.json"
    _rewrite(released, lambda e: e[0].update(difference_captions=["Remove the lamp. ", "Add a red chair.", "  "]))
    triplets = read_source(_cirr_r(tmp_path, caption_mode="joined"))
    assert [t.id for t in triplets] == ["cirr_r-0", "cirr_r-1"]
    assert triplets[0].caption == "Remove the lamp and Add a red chair"
    semicolons = read_source(_cirr_r(tmp_path, caption_mode="joined", caption_joiner="; "))
    assert semicolons[0].caption == "Remove the lamp; Add a red chair"


def test_cirr_r_relative_paths_unknown_names_and_entries_without_captions(tmp_path):
    write_cirr_r(tmp_path / "cirr_r", tmp_path / "cirr", 3)

    def edit(entries):
        entries[0]["query_image_url"] = "./extra/ref0.png"  # a relative path: a file under the CIRR root
        entries[1]["retrieved_image_url"] = "https://images.example/cirr/train/not-in-cirr.png"
        entries[2]["difference_captions"] = []

    _rewrite(tmp_path / "cirr_r/rewritten_captions/rewritten_train.json", edit)
    triplets = read_source(_cirr_r(tmp_path))
    assert [t.id for t in triplets] == ["cirr_r-0-0", "cirr_r-0-1", "cirr_r-1-0", "cirr_r-1-1"]
    assert triplets[0].reference_path == os.path.normpath(tmp_path / "cirr/extra/ref0.png")
    # A name CIRR does not list has no path: the shard builder skips and counts it (unknown_image_name).
    assert triplets[2].target_path is None and triplets[2].reference_path is not None


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda e: e[1].pop("retrieved_image_url"), r"entry 1: missing key\(s\) \['retrieved_image_url'\]"),
        (lambda e: e[1].update(difference_captions="add a hat"), r"entry 1: 'difference_captions' must be a list"),
        (lambda e: e[1].update(difference_captions=["ok", 3]), r"entry 1: difference_captions\[1\] must be a string"),
        (lambda e: e[1].update(query_image_url=7), r"entry 1: 'query_image_url' must be a string"),
        (lambda e: e[1].update(query_image_url=""), r"entry 1: 'query_image_url' is empty"),
        (lambda e: e[1].update(query_image_url="https://images.example/"), r"entry 1: 'query_image_url'=.* names no"),
        (lambda e: e.__setitem__(1, ["a", "b"]), r"entry 1: expected an object"),
    ],
)
def test_cirr_r_malformed_entry_names_the_file_and_the_entry(tmp_path, edit, message):
    write_cirr_r(tmp_path / "cirr_r", tmp_path / "cirr", 2)
    _rewrite(tmp_path / "cirr_r/rewritten_captions/rewritten_train.json", edit)
    with pytest.raises(SourceError, match=r"rewritten_captions/rewritten_train\.json " + message):
        read_source(_cirr_r(tmp_path))


def test_cirr_r_missing_files_are_named(tmp_path):
    with pytest.raises(SourceError, match=r"CIRR_R captions of split 'val' not found: .*rewritten_val\.json"):
        read_source(_cirr_r(tmp_path, split="val"))
    write_cirr_r(tmp_path / "cirr_r", tmp_path / "cirr", 1)
    (tmp_path / "cirr/cirr/image_splits/split.rc2.train.json").unlink()
    with pytest.raises(SourceError, match=r"not found: .*cirr/image_splits/split\.rc2\.train\.json"):
        read_source(_cirr_r(tmp_path))


def test_hotel_cir_reader_finds_images_by_the_last_url_components(tmp_path):
    entries = write_hotel_cir(tmp_path, 3)
    val = write_hotel_cir(tmp_path, 2, split="val")
    triplets = read_source(SourceConfig(name="hotel", kind="hotel_cir", path=str(tmp_path)))
    assert [t.id for t in triplets] == ["hotel-0", "hotel-1", "hotel-2"]
    assert triplets[1].caption == entries[1]["difference"] and triplets[1].reference_name == entries[1]["query_image"]
    assert triplets[1].reference_path == os.path.normpath(tmp_path / "images/train/1/101/q_1.png")
    assert all(os.path.isfile(t.reference_path) and os.path.isfile(t.target_path) for t in triplets)
    val_triplets = read_source(SourceConfig(name="hotel", kind="hotel_cir", path=str(tmp_path), split="val"))
    assert val_triplets[0].target_path == os.path.normpath(tmp_path / "images/val_test/0/100/r_0.png")
    assert val_triplets[0].caption == val[0]["difference"] and os.path.isfile(val_triplets[0].target_path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda e: e[2].pop("difference"), r"entry 2: missing key\(s\) \['difference'\]"),
        (lambda e: e[2].update(difference=["a", "b"]), r"entry 2: 'difference' must be a string"),
        (lambda e: e[2].update(result_image=None), r"entry 2: 'result_image' must be a string"),
        (lambda e: e[2].update(query_image="https://hotels.example"), r"entry 2: 'query_image'=.* names no image"),
    ],
)
def test_hotel_cir_malformed_entry_names_the_file_and_the_entry(tmp_path, edit, message):
    write_hotel_cir(tmp_path, 3)
    _rewrite(tmp_path / "captions/hotel_train_data.json", edit)
    with pytest.raises(SourceError, match=r"captions/hotel_train_data\.json " + message):
        read_source(SourceConfig(name="hotel", kind="hotel_cir", path=str(tmp_path)))


def test_fashioniq_training_source_uses_the_benchmark_caption_template(tmp_path):
    dresses = write_fashioniq(tmp_path, 2, "dress")
    shirts = write_fashioniq(tmp_path, 3, "shirt")
    source = SourceConfig(name="fiq", kind="fashioniq", path=str(tmp_path), categories=["shirt", "dress"])
    triplets = read_source(source)
    assert [t.id for t in triplets] == ["fiq-shirt-0", "fiq-shirt-1", "fiq-shirt-2", "fiq-dress-0", "fiq-dress-1"]
    # The training text is the text the FashionIQ benchmark scores: one template, shared with the eval reader.
    assert triplets[3].caption == fashioniq_text(dresses[0]["captions"])
    assert triplets[3].caption.startswith("Replace ") and " and replace " in triplets[3].caption
    assert triplets[0].reference_name == shirts[0]["candidate"]
    assert triplets[0].target_path == os.path.normpath(tmp_path / "images" / f"{shirts[0]['target']}.png")
    assert all(os.path.isfile(t.reference_path) and os.path.isfile(t.target_path) for t in triplets)
    with pytest.raises(SourceError, match=r"FashionIQ toptee captions of split 'train' not found: .*cap\.toptee"):
        read_source(SourceConfig(name="fiq", kind="fashioniq", path=str(tmp_path)))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda e: e[1].pop("candidate"), r"entry 1: missing key\(s\) \['candidate'\]"),
        (lambda e: e[1].update(captions=["only one"]), r"entry 1: a FashionIQ query has two captions, got 1"),
        (lambda e: e[1].update(captions="is red"), r"entry 1: 'captions' must be a list of two strings"),
        (lambda e: e[1].update(target=12), r"entry 1: 'target' must be a string"),
        (lambda e: e[1].update(candidate="../../etc/x"), r"entry 1: 'candidate' must be an image name without a dir"),
    ],
)
def test_fashioniq_malformed_entry_names_the_file_and_the_entry(tmp_path, edit, message):
    write_fashioniq(tmp_path, 2, "toptee")
    _rewrite(tmp_path / "captions/cap.toptee.train.json", edit)
    with pytest.raises(SourceError, match=r"captions/cap\.toptee\.train\.json " + message):
        read_source(SourceConfig(name="fiq", kind="fashioniq", path=str(tmp_path), categories=["toptee"]))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"kind": "cirr_r", "caption_mode": "all"}, r"data.sources\[s\].caption_mode='all' must be one of"),
        ({"kind": "hotel_cir", "caption_mode": "joined"}, r"caption_mode and caption_joiner apply to cirr_r"),
        ({"kind": "cirr_r", "caption_mode": "joined", "caption_joiner": ""}, r"caption_joiner must not be empty"),
        ({"kind": "fashioniq", "categories": ["dress", "skirt"]}, r"categories=\['dress', 'skirt'\] must be"),
        ({"kind": "fashioniq", "categories": []}, r"categories=\[\] must be distinct"),
        ({"kind": "cirr", "categories": ["dress"]}, r"categories applies to fashioniq sources only"),
        ({"kind": "hotel_cir", "image_root": "/coco"}, r"image_root applies to lasco and cirr_r sources only"),
        ({"kind": "hotel"}, r"kind='hotel' must be one of .*'cirr_r', 'hotel_cir', 'fashioniq'"),
    ],
)
def test_source_options_are_validated(options, message):
    with pytest.raises(ValueError, match=message):
        SourceConfig(name="s", path="/data", **options)


def test_bad_source_option_in_a_config_file_names_the_file_and_key(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        "data:\n  shards_dir: /s\n  sources:\n    - {name: cirr_r, kind: cirr_r, path: /d, caption_mode: both}\n"
    )
    with pytest.raises(ConfigError, match=rf"{config}: .*data.sources\[cirr_r\].caption_mode='both'"):
        load_config(config)


def test_build_shards_from_the_released_layouts(tmp_path):
    write_cirr_r(tmp_path / "cirr_r", tmp_path / "cirr", 3)
    write_hotel_cir(tmp_path / "hotel", 2)
    write_fashioniq(tmp_path / "fiq", 2, "dress")
    (tmp_path / "hotel/images/train/1/101/r_1.png").unlink()  # a missing image is skipped and counted
    sources = [
        _cirr_r(tmp_path, trees=str(tmp_path / "cirr_r/cirr_r_trees.jsonl")),
        SourceConfig(
            name="hotel",
            kind="hotel_cir",
            path=str(tmp_path / "hotel"),
            trees=str(tmp_path / "hotel/hotel_trees.jsonl"),
        ),
        SourceConfig(
            name="fiq",
            kind="fashioniq",
            path=str(tmp_path / "fiq"),
            categories=["dress"],
            trees=str(tmp_path / "fiq/fashioniq_trees.jsonl"),
        ),
    ]
    data = DataConfig(
        sources=sources,
        shards_dir=str(tmp_path / "shards"),
        samples_per_shard=5,
        image_short_side=10,
        build_workers=1,
        noun_phrases=NounPhraseConfig(parser="trees"),
    )
    report = build_shards(data, TINY_BACKBONE, progress=False)
    assert {name: stats["samples"] for name, stats in report.sources.items()} == {"cirr_r": 6, "hotel": 1, "fiq": 2}
    assert report.sources["hotel"]["skipped"] == 1
    texts, metadata = {}, {}
    for path in sorted((tmp_path / "shards").glob("shard-*.tar")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, field = split_member_name(member.name)
                if field == "txt":
                    texts[key] = tar.extractfile(member).read().decode("utf-8")
                elif field == "json":
                    metadata[key] = json.loads(tar.extractfile(member).read())
    expected = {f"cirr_r-{pair}-{n}" for pair in range(3) for n in range(2)} | {"hotel-0", "fiq-dress-0", "fiq-dress-1"}
    assert set(texts) == expected
    assert texts["fiq-dress-1"].startswith("Replace the ") and " and replace the " in texts["fiq-dress-1"]
    # The joined FashionIQ caption keeps the noun phrases of both of its captions.
    assert len(metadata["fiq-dress-1"]["noun_phrases"]) == 4
    assert metadata["cirr_r-1-0"]["reference"].endswith("/train-1-0-img0.png")
