"""Shard building end to end: CIRR-layout fixture -> tar shards + index.json via launch/build_shards.py.

Covers: totals equal triplets minus reported skips (one missing and one corrupt image), sample contents, a
weighted mixture of all three source kinds, byte determinism for a seed, and resume (only damaged shards rebuilt).
"""

from __future__ import annotations

import io
import json
import tarfile
from collections import defaultdict
from pathlib import Path

import pytest
from PIL import Image
from raw_dataset_fixtures import write_cirr, write_lasco, write_manifest

from launch import build_shards as build_shards_launcher
from shards.builder.shard_set import build_shards
from shards.config import DataConfig, NounPhraseConfig, SourceConfig
from shards.format import FIELDS, ShardIndex, decode_tokens, file_sha256, split_member_name
from shards.model_inputs import TINY_BACKBONE, tokenizer, tokenizer_name

TRIPLETS = 11


def _config_file(
    tmp_path: Path, root: Path, shards: Path, split: str = "train", seed: int = 0, workers: int = 2
) -> Path:
    config = tmp_path / f"build-{shards.name}.yaml"
    config.write_text(
        f"""
model:
  backbone: {TINY_BACKBONE}
data:
  sources:
    - name: cirr
      kind: cirr
      path: {root}
      split: {split}
      trees: {root / "trees.jsonl"}
  shards_dir: {shards}
  samples_per_shard: 4
  image_short_side: 12
  build_workers: {workers}
  build_on: processes
  seed: {seed}
  noun_phrases:
    parser: trees
"""
    )
    return config


@pytest.fixture()
def damaged_cirr(tmp_path) -> Path:
    """CIRR layout with one missing target image and one corrupt reference image."""
    root = tmp_path / "cirr_root"
    write_cirr(root, TRIPLETS)
    (root / "train/2/train-2-1-img0.png").unlink()
    (root / "train/1/train-4-0-img0.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return root


def _samples(shards_dir: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = defaultdict(dict)
    for path in sorted(shards_dir.glob("shard-*.tar")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, field = split_member_name(member.name)
                samples[key][field] = tar.extractfile(member).read()
    return samples


def test_build_reports_skips_and_totals_match(tmp_path, damaged_cirr, capsys):
    shards = tmp_path / "shards"
    assert build_shards_launcher.main(["--config", str(_config_file(tmp_path, damaged_cirr, shards))]) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary == f"built {TRIPLETS - 2} samples in 3 shards; skipped 2 (cirr: missing_image=1 unreadable_image=1)"

    index = json.loads((shards / "index.json").read_text())
    entries = json.loads((damaged_cirr / "cirr/captions/cap.rc2.train.json").read_text())
    stats = index["sources"]["cirr"]
    assert stats["skip_reasons"] == {"missing_image": 1, "unreadable_image": 1}
    assert index["totals"]["samples"] == len(entries) - index["totals"]["skipped"] == TRIPLETS - 2
    assert (stats["read"], stats["taken"], stats["samples"]) == (TRIPLETS, TRIPLETS, TRIPLETS - 2)
    assert index["tokenizer"] == tokenizer_name(TINY_BACKBONE)
    assert index["noun_phrases"] == {"parser": "trees", "max_nps": 10, "selection": "bfs", "np_length": 16}
    loaded = ShardIndex.load(shards)
    for entry in loaded.shards:
        assert file_sha256(shards / entry.name) == entry.sha256

    samples = _samples(shards)
    assert sorted(samples) == sorted(f"cirr-{100 + n}" for n in range(TRIPLETS) if n not in (2, 4))
    clip = tokenizer(TINY_BACKBONE)
    for key, fields in samples.items():
        assert set(fields) == set(FIELDS)
        metadata = json.loads(fields["json"])
        caption = fields["txt"].decode()
        tokens = decode_tokens(fields, max_nps=10, np_length=16)
        assert metadata["id"] == key and len(metadata["noun_phrases"]) == 2 == tokens.np_mask.sum()
        for row, phrase in enumerate(metadata["noun_phrases"]):
            start, end = tokens.np_spans[row]
            assert tokens.caption_ids[start:end].tolist() == clip.encode(phrase)
        assert caption.startswith("replace ") and metadata["noun_phrases"][0] in caption
    assert sum(entry.count for entry in loaded.shards) == len(samples)


def test_same_seed_same_bytes_and_resume_rebuilds_only_damaged_shards(tmp_path, damaged_cirr):
    first, second = tmp_path / "first", tmp_path / "second"
    # Different worker counts too: the bytes depend on the seed only.
    for shards, workers in ((first, 2), (second, 1)):
        config = _config_file(tmp_path, damaged_cirr, shards, workers=workers)
        assert build_shards_launcher.main(["--config", str(config)]) == 0
    names = sorted(path.name for path in first.glob("shard-*.tar"))
    assert len(names) == 3
    for name in [*names, "index.json"]:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    other_seed = tmp_path / "other"
    build_shards_launcher.main(["--config", str(_config_file(tmp_path, damaged_cirr, other_seed, seed=1))])
    assert (other_seed / names[0]).read_bytes() != (first / names[0]).read_bytes()

    original = {name: (first / name).read_bytes() for name in names}
    (first / names[0]).unlink()
    sidecar = first / f"{names[1]}.done.json"
    sidecar.write_text(sidecar.read_text().replace('"sha256": "', '"sha256": "0'))
    untouched = first / names[2]
    before = untouched.stat()
    data = DataConfig(
        sources=[
            SourceConfig(name="cirr", kind="cirr", path=str(damaged_cirr), trees=str(damaged_cirr / "trees.jsonl"))
        ],
        shards_dir=str(first),
        samples_per_shard=4,
        image_short_side=12,
        build_workers=2,
        noun_phrases=NounPhraseConfig(parser="trees"),
    )
    report = build_shards(data, TINY_BACKBONE, progress=False)
    assert report.rebuilt == 2
    assert untouched.stat().st_mtime_ns == before.st_mtime_ns and untouched.stat().st_ino == before.st_ino
    for name in names:
        assert (first / name).read_bytes() == original[name], name

    # A truncated tar (an interrupted copy) no longer matches its sidecar's sha256 and is rebuilt too.
    (first / names[2]).write_bytes(original[names[2]][:1000])
    assert build_shards(data, TINY_BACKBONE, progress=False).rebuilt == 1
    assert (first / names[2]).read_bytes() == original[names[2]]
    assert (first / "index.json").read_bytes() == (second / "index.json").read_bytes()


def test_weighted_mixture_of_every_source_kind(tmp_path):
    write_cirr(tmp_path / "cirr", 5)
    write_lasco(tmp_path / "lasco_train.json", tmp_path / "coco", 4)
    write_manifest(tmp_path / "manifest.jsonl", 4)
    sources = [
        SourceConfig(name="cirr", kind="cirr", path=str(tmp_path / "cirr"), trees=str(tmp_path / "cirr/trees.jsonl")),
        SourceConfig(
            name="lasco",
            kind="lasco",
            path=str(tmp_path / "lasco_train.json"),
            image_root=str(tmp_path / "coco"),
            weight=2.0,
            trees=str(tmp_path / "lasco_trees.jsonl"),
        ),
        SourceConfig(
            name="hotel",
            kind="jsonl",
            path=str(tmp_path / "manifest.jsonl"),
            weight=0.5,
            trees=str(tmp_path / "manifest_trees.jsonl"),
        ),
    ]
    data = DataConfig(
        sources=sources,
        shards_dir=str(tmp_path / "shards"),
        samples_per_shard=8,
        image_short_side=10,
        build_workers=1,
        noun_phrases=NounPhraseConfig(parser="trees"),
    )
    report = build_shards(data, TINY_BACKBONE, progress=False)
    stats = report.sources
    assert (stats["cirr"]["taken"], stats["lasco"]["taken"]) == (5, 8)
    assert 0 <= stats["hotel"]["taken"] <= 4 and stats["hotel"]["read"] == 4
    samples = _samples(tmp_path / "shards")
    assert report.samples == len(samples) == 13 + stats["hotel"]["taken"]
    assert {key for key in samples if key.startswith("lasco-7001")} == {"lasco-7001", "lasco-7001-r1"}
    with Image.open(io.BytesIO(samples["lasco-7001"]["ref.jpg"])) as image:
        assert image.format == "JPEG" and min(image.size) == 10 and image.size == (15, 10)


def test_build_errors_exit_nonzero_with_the_path(tmp_path, capsys):
    root = tmp_path / "test1_root"
    write_cirr(root, 2, split="test1", with_targets=False)
    assert build_shards_launcher.main(["--config", str(_config_file(tmp_path, root, tmp_path / "s", "test1"))]) == 1
    assert "test1" in capsys.readouterr().err
    (root / "trees.jsonl").unlink()
    write_cirr(root, 2, split="train")
    (root / "trees.jsonl").unlink()
    assert build_shards_launcher.main(["--config", str(_config_file(tmp_path, root, tmp_path / "s"))]) == 1
    assert str(root / "trees.jsonl") in capsys.readouterr().err
