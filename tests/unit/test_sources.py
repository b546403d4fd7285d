"""Raw dataset readers (CIRR layout, LaSCo, JSONL manifest) and the weighted mixture."""

from __future__ import annotations

import json
import os
import random
from collections import Counter

import pytest
from raw_dataset_fixtures import write_cirr, write_lasco, write_manifest

from shards.builder.sources import SourceError, mixture, read_cirr, read_jsonl, read_lasco, read_source
from shards.builder.triplets import iter_json_list
from shards.config import SourceConfig


def test_cirr_reader_resolves_names_through_the_image_split(tmp_path):
    entries = write_cirr(tmp_path, 4)
    triplets = read_cirr(SourceConfig(name="cirr", kind="cirr", path=str(tmp_path)))
    assert [t.id for t in triplets] == [f"cirr-{e['pairid']}" for e in entries]
    first = triplets[0]
    assert first.caption == entries[0]["caption"]
    assert first.reference_name == entries[0]["reference"] and first.target_name == entries[0]["target_hard"]
    assert first.reference_path == os.path.normpath(tmp_path / "train/0/train-0-0-img0.png")
    assert os.path.isfile(first.reference_path) and os.path.isfile(first.target_path)


def test_cirr_name_missing_from_the_image_split_has_no_path(tmp_path):
    write_cirr(tmp_path, 2)
    split_file = tmp_path / "cirr/image_splits/split.rc2.train.json"
    images = json.loads(split_file.read_text())
    del images["train-1-1-img0"]
    split_file.write_text(json.dumps(images))
    triplets = read_cirr(SourceConfig(name="c", kind="cirr", path=str(tmp_path)))
    assert triplets[0].target_path is not None and triplets[1].target_path is None


def test_cirr_missing_annotation_names_the_file(tmp_path):
    write_cirr(tmp_path, 2)
    with pytest.raises(SourceError, match=r"cap\.rc2\.val\.json"):
        read_cirr(SourceConfig(name="c", kind="cirr", path=str(tmp_path), split="val"))
    (tmp_path / "cirr/image_splits/split.rc2.train.json").unlink()
    with pytest.raises(SourceError, match=r"split\.rc2\.train\.json"):
        read_cirr(SourceConfig(name="c", kind="cirr", path=str(tmp_path)))


def test_cirr_split_without_targets_cannot_be_built(tmp_path):
    write_cirr(tmp_path, 2, split="test1", with_targets=False)
    with pytest.raises(SourceError, match="test1.*no target"):
        read_cirr(SourceConfig(name="c", kind="cirr", path=str(tmp_path), split="test1"))


def test_lasco_reader(tmp_path):
    coco = tmp_path / "coco"
    entries = write_lasco(tmp_path / "lasco_train.json", coco, 3)
    source = SourceConfig(name="lasco", kind="lasco", path=str(tmp_path / "lasco_train.json"), image_root=str(coco))
    triplets = read_source(source)
    assert [t.id for t in triplets] == ["lasco-7000", "lasco-7001", "lasco-7002"]
    assert triplets[1].caption == entries[1]["query-text"]
    assert triplets[1].reference_path == os.path.normpath(coco / entries[1]["query-image"][1])
    assert triplets[1].target_path == os.path.normpath(coco / entries[1]["target-image"][1])


def test_lasco_errors_name_the_file(tmp_path):
    missing = SourceConfig(name="l", kind="lasco", path=str(tmp_path / "lasco_val.json"), image_root=str(tmp_path))
    with pytest.raises(SourceError, match="lasco_val.json"):
        read_lasco(missing)
    bad = tmp_path / "lasco_train.json"
    bad.write_text(json.dumps([{"qid": 1, "query-image": "x.jpg", "query-text": "t", "target-image": [1, "y.jpg"]}]))
    with pytest.raises(SourceError, match=r"lasco_train\.json entry 0.*query-image"):
        read_lasco(SourceConfig(name="l", kind="lasco", path=str(bad), image_root=str(tmp_path)))


def test_jsonl_reader_paths_relative_to_the_manifest(tmp_path):
    manifest = tmp_path / "data" / "manifest.jsonl"
    manifest.parent.mkdir()
    lines = write_manifest(manifest, 3)
    triplets = read_jsonl(SourceConfig(name="hotel", kind="jsonl", path=str(manifest)))
    assert [t.id for t in triplets] == ["hotel-m0", "hotel-m1", "hotel-m2"]
    assert triplets[2].reference_path == os.path.normpath(manifest.parent / lines[2]["reference"])
    assert os.path.isfile(triplets[2].target_path)


def test_jsonl_bad_line_names_file_and_line(tmp_path):
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text('{"id": 1, "reference": "a.png", "target": "b.png", "caption": "c"}\n\n{"id": 2,\n')
    with pytest.raises(SourceError, match=r"manifest\.jsonl line 3"):
        read_jsonl(SourceConfig(name="j", kind="jsonl", path=str(manifest)))
    manifest.write_text('{"id": 1, "reference": "a.png", "caption": "c"}\n')
    with pytest.raises(SourceError, match=r"line 1.*target"):
        read_jsonl(SourceConfig(name="j", kind="jsonl", path=str(manifest)))
    with pytest.raises(SourceError, match="nowhere.jsonl"):
        read_jsonl(SourceConfig(name="j", kind="jsonl", path=str(tmp_path / "nowhere.jsonl")))


def _two_sources(tmp_path, weights: tuple[float, float]):
    write_cirr(tmp_path / "cirr", 40)
    manifest = tmp_path / "manifest.jsonl"
    write_manifest(manifest, 40)
    sources = [
        SourceConfig(name="cirr", kind="cirr", path=str(tmp_path / "cirr"), weight=weights[0]),
        SourceConfig(name="hotel", kind="jsonl", path=str(manifest), weight=weights[1]),
    ]
    return sources, {source.name: read_source(source) for source in sources}


def test_mixture_weights_are_seeded_copies(tmp_path):
    sources, triplets = _two_sources(tmp_path, (2.5, 0.5))
    items = mixture(sources, triplets, seed=3)
    assert [(i.key, i.copy) for i in items] == [(i.key, i.copy) for i in mixture(sources, triplets, seed=3)]
    assert [i.key for i in items] != [i.key for i in mixture(sources, triplets, seed=4)]
    copies = Counter(item.triplet.id for item in items)
    cirr = [copies[t.id] for t in triplets["cirr"]]
    hotel = [copies[t.id] for t in triplets["hotel"]]
    assert set(cirr) <= {2, 3} and 2 in cirr and 3 in cirr
    assert set(hotel) <= {0, 1} and 0 < sum(hotel) < 40
    assert len({item.key for item in items}) == len(items), "repeated copies must get distinct keys"
    repeated = [item for item in items if item.triplet.id == "cirr-100"]
    assert [item.key for item in repeated][:2] == ["cirr-100", "cirr-100-r1"]


def test_mixture_weight_one_takes_every_triplet_once(tmp_path):
    sources, triplets = _two_sources(tmp_path, (1.0, 1.0))
    items = mixture(sources, triplets, seed=0)
    assert [item.triplet for item in items] == triplets["cirr"] + triplets["hotel"]


def test_duplicate_ids_are_an_error(tmp_path):
    manifest = tmp_path / "manifest.jsonl"
    line = {"id": "a.1", "reference": "r.png", "target": "t.png", "caption": "c"}
    manifest.write_text(json.dumps(line) + "\n" + json.dumps({**line, "id": "a_1"}) + "\n")
    source = SourceConfig(name="j", kind="jsonl", path=str(manifest))
    with pytest.raises(SourceError, match="not unique"):
        mixture([source], {"j": read_source(source)}, seed=0)


def test_a_json_list_is_read_one_entry_at_a_time_whatever_the_read_size(tmp_path):
    """Entries split across reads at every position (a number cut as "-1500." included) come back whole."""
    rng = random.Random(0)
    path = tmp_path / "entries.json"
    for _ in range(50):
        entries = [
            rng.choice([-1.5e3, 123456, 1e-7, "a],{", {"k": [1, {"x": "]"}]}, None, True, [], "é€"])
            for _ in range(rng.randint(0, 30))
        ]
        path.write_text(json.dumps(entries, indent=rng.choice([None, 2]), ensure_ascii=rng.random() < 0.5))
        for read_chars in (1, 2, 5, 1 << 20):
            assert list(iter_json_list(path, "entries", read_chars)) == entries
    for text, message in (
        ('{"a": 1}', "expected a JSON list"),
        ("[1, 2", "not valid JSON"),
        ("[1 2]", "not valid JSON"),
        ("[1,]", "not valid JSON"),
        ("[1] x", "not valid JSON"),
    ):
        path.write_text(text)
        for read_chars in (1, 1 << 20):
            with pytest.raises(SourceError, match=message):
                list(iter_json_list(path, "entries", read_chars))
    with pytest.raises(SourceError, match="entries not found"):
        iter_json_list(tmp_path / "missing.json", "entries")  # at the call, before any entry is asked for
