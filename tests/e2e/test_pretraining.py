"""Pretrained towers for the embedded default (DESIGN section 14).

The synthetic benchmark describes every image and boxes every NP; a JSONL source carries the boxes into the shards
and the reader's batches; the towers objective trains only the towers and grounds phrases in their boxes; and
`launch/pretrain_towers.py` runs the real Ray + DeepSpeed job once, then reuses its cached open_clip weights file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cluster.root_config import load_config
from shards.builder.shard_set import build_shards
from shards.builder.sources import SourceError, read_source
from shards.config import SourceConfig
from shards.stream.reader import build_reader
from shards.synthetic import generate
from shards.synthetic.descriptions import cell_box, describe
from shards.synthetic.render import object_box
from shards.synthetic.scenes import Scene, SceneObject
from training.objectives.tower_pretraining import TowerPretrainObjective, patches_in_boxes

REPO = Path(__file__).resolve().parents[2]
PRETRAIN = str(REPO / "configs" / "tiny_pretrain.yaml")


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pretrain") / "synthetic"
    generate(root, seed=5, n_train=40, n_val=10, n_test=5)
    return root


def _config(root: Path, *overrides: str):
    return load_config(
        PRETRAIN,
        [
            f"data.sources=[{{name: described, kind: jsonl, path: {root / 'pretrain' / 'train.jsonl'}, "
            f"trees: {root / 'pretrain' / 'trees.jsonl'}}}]",
            f"data.shards_dir={root.parent / 'shards'}",
            "data.samples_per_shard=16",
            f"cluster.storage_path={root.parent / 'runs'}",
            f"pretrain.towers_out={root.parent / 'towers' / 'tiny.safetensors'}",
            f"eval.datasets.synthetic.root={root}",
            *overrides,
        ],
    )


def test_a_description_names_every_object_with_its_box() -> None:
    scene = Scene(
        (
            SceneObject("o0", "circle", "red", "small", (0, 0)),
            SceneObject("o1", "square", "blue", "large", (1, 1), (0.03, -0.02)),
        )
    )
    description = describe(scene)
    assert description.text == "a small red circle at the top left and a large blue square in the center"
    by_text = {phrase.text: phrase for phrase in description.phrases}
    assert by_text["a small red circle"].box == tuple(round(v, 4) for v in object_box(scene.objects[0]))
    assert by_text["a large blue square in the center"].box == by_text["a large blue square"].box
    assert (
        by_text["the center"].box == tuple(round(v, 4) for v in cell_box((1, 1)))
        and by_text["the center"].kind == "position"
    )
    for phrase in description.phrases:
        assert description.text[phrase.char_start : phrase.char_start + len(phrase.text)] == phrase.text


def test_caption_phrases_carry_their_kind_and_box(bench: Path) -> None:
    annotations = json.loads((bench / "objects.json").read_text())
    captions = {entry["pairid"]: entry for entry in json.loads((bench / "cirr/captions/cap.rc2.val.json").read_text())}
    kinds = set()
    for pairid, phrases in annotations["captions"]["val"].items():
        entry = captions[int(pairid)]
        objects = {o["id"]: o for o in annotations["images"][entry["reference"]]["objects"]}
        for phrase in phrases:
            kinds.add(phrase["kind"])
            start = phrase["char_start"]
            assert entry["caption"][start : start + len(phrase["np"])] == phrase["np"]
            if phrase["kind"] == "present":
                assert phrase["box"] == objects[phrase["object"]]["box"]
            elif phrase["kind"] in ("added", "position"):
                x0, y0, x1, y1 = phrase["box"]
                assert phrase["object"] is None and round((x1 - x0) * 3, 3) == round((y1 - y0) * 3, 3) == 1.0
    assert {"present", "added", "position"} <= kinds
    assert all("description" in image for image in annotations["images"].values())


def test_phrase_boxes_reach_the_readers_batches(bench: Path) -> None:
    config = _config(bench)
    build_shards(config.data, config.model.backbone, progress=False)
    manifest = [json.loads(line) for line in (bench / "pretrain" / "train.jsonl").read_text().splitlines()]
    boxes = {(line["caption"], p["text"]): p["box"] for line in manifest for p in line["phrases"]}
    with build_reader(config.data, config.model.backbone, 8, 0, 1) as reader:
        batch = next(iter(reader))
    mask = batch["np_mask"]
    assert mask.any() and torch.isfinite(batch["np_boxes"][mask]).all()
    assert torch.isnan(batch["np_boxes"][~mask]).all()
    for row, caption in enumerate(batch["captions"]):
        for column, text in enumerate(batch["noun_phrases"][row]):
            np.testing.assert_allclose(batch["np_boxes"][row, column].numpy(), boxes[(caption, text)], atol=1e-6)


def test_malformed_phrase_boxes_name_the_line(tmp_path: Path) -> None:
    manifest = tmp_path / "m.jsonl"
    good = {"id": 1, "reference": "a.png", "target": "a.png", "caption": "a red circle"}
    bad = {**good, "id": 2, "phrases": [{"text": "a red circle", "box": [0.5, 0.1, 0.2, 0.9]}]}
    manifest.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(SourceError, match=r"m\.jsonl line 2: phrases\[0\]"):
        read_source(SourceConfig(name="m", kind="jsonl", path=str(manifest)))


def test_patches_in_boxes_follow_patch_centres() -> None:
    inside = patches_in_boxes(torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.6, 0.6, 0.62, 0.62]]), (4, 4)).view(2, 4, 4)
    assert inside[0].sum() == 4 and inside[0, :2, :2].all()
    assert inside[1].sum() == 1 and inside[1, 2, 2]  # too small for a centre: the patch under its own centre


def test_the_objective_trains_only_the_towers_and_pulls_maps_into_boxes(bench: Path) -> None:
    config = _config(bench)
    build_shards(config.data, config.model.backbone, progress=False)
    torch.manual_seed(0)
    objective = TowerPretrainObjective(config.model, config.pretrain)
    trainable = [name for name, p in objective.named_parameters() if p.requires_grad]
    assert trainable and all(name.startswith("model.backbone.") for name in trainable)
    with build_reader(config.data, config.model.backbone, 16, 0, 1) as reader:
        batch = next(iter(reader))
    optimizer = torch.optim.AdamW([p for p in objective.parameters() if p.requires_grad], lr=2e-3)
    first = None
    for _ in range(12):
        outputs = objective(batch)
        loss = sum(value for name, value in outputs.items() if name.endswith("_loss"))
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is None for n, p in objective.named_parameters() if not n.startswith("model.backbone."))
        optimizer.step()
        first = first if first is not None else {name: float(value.detach()) for name, value in outputs.items()}
    assert {"description_loss", "region_loss", "map_loss", "phrase_image_loss"} <= outputs.keys()
    assert float(outputs["pretrain/map_raw"]) < first["pretrain/map_raw"]
    assert float(outputs["description_loss"]) < first["description_loss"]


def test_towers_digest_follows_data_and_config_not_where_they_live(tmp_path: Path) -> None:
    from cluster.jobs.tower_cache import towers_digest

    first, second = tmp_path / "a" / "shards", tmp_path / "b" / "elsewhere"
    for directory in (first, second):
        directory.mkdir(parents=True)
        (directory / "index.json").write_text('{"shards": [{"name": "shard-000000.tar", "sha256": "00"}]}')

    def digest(shards: Path, *overrides: str) -> str:
        return towers_digest(load_config("configs/tiny_pretrain.yaml", [f"data.shards_dir={shards}", *overrides]))

    moved = ["data.sources.0.path=/mnt/described/train.jsonl", f"cluster.storage_path={tmp_path}/runs"]
    assert digest(first) == digest(second) == digest(second, *moved)
    assert digest(first, "pretrain.temperature=0.05") != digest(first)
    (second / "index.json").write_text('{"shards": [{"name": "shard-000000.tar", "sha256": "01"}]}')
    assert digest(second) != digest(first)


@pytest.mark.slow
def test_pretrain_towers_trains_once_then_reuses_the_cache(bench: Path) -> None:
    """The real job (local Ray on 127.0.0.1, 1 DeepSpeed worker) writes open_clip weights; a rerun reuses them."""
    config = _config(bench, "cluster.num_workers=1", "train.global_batch=8", "train.micro_batch=8")
    build_shards(config.data, config.model.backbone, progress=False)
    out = Path(config.pretrain.towers_out)
    settings = [
        f"data.sources=[{{name: described, kind: jsonl, path: {bench / 'pretrain' / 'train.jsonl'}, "
        f"trees: {bench / 'pretrain' / 'trees.jsonl'}}}]",
        f"data.shards_dir={config.data.shards_dir}",
        "data.samples_per_shard=16",
        f"cluster.storage_path={config.cluster.storage_path}",
        f"pretrain.towers_out={out}",
        f"eval.datasets.synthetic.root={bench}",
        "cluster.num_workers=1", "train.global_batch=8", "train.micro_batch=8", "train.steps=3",
        "checkpoint.every_steps=3", "logging.every=1",
    ]  # fmt: skip
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    command = [sys.executable, str(REPO / "launch" / "pretrain_towers.py"), "--config", PRETRAIN, *settings]
    first = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "trained in" in first.stdout and "description -> image over" in first.stdout
    cached = next((Path(config.cluster.storage_path) / "towers").glob("ContextTiny-*.safetensors"))
    assert out.read_bytes() == cached.read_bytes()
    out.unlink()
    again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "reused from the cache" in again.stdout, again.stdout + again.stderr
    assert "ray" not in again.stdout.lower().split("towers:")[0]  # no Ray started for a cache hit
    assert out.read_bytes() == cached.read_bytes()

    import open_clip
    from safetensors.torch import load_file

    from training.model.config import ModelConfig
    from training.model.context_cir import build_model

    clip_model, _, _ = open_clip.create_model_and_transforms("ContextTiny", pretrained=str(out))
    saved = load_file(str(out))
    for name, tensor in clip_model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    started = build_model(ModelConfig(backbone="ContextTiny", weights_file=str(out), fusion_layers=1))
    for name, tensor in started.backbone.clip.state_dict().items():
        assert torch.equal(tensor, saved[name]), name


def test_boxes_follow_the_centre_crop_and_old_shards_keep_their_fingerprints() -> None:
    from dataclasses import replace

    from shards.builder.shard_set import _hashed
    from shards.builder.writer import SampleSpec
    from shards.stream.decode import _boxes_in_crop

    boxes = _boxes_in_crop([[0.25, 0.2, 0.75, 0.6], [0.0, 0.0, 0.2, 0.2], None], 3, 4, (200, 100))
    np.testing.assert_allclose(boxes[0], [0.0, 0.2, 1.0, 0.6], atol=1e-6)
    assert np.isnan(boxes[1:]).all()  # cropped away, unknown, padding
    spec = SampleSpec("k", "i", "s", 0, "a red cube", "r", "t", "r.png", "t.png", [("a red cube", 0, 10)])
    assert "phrase_boxes" not in _hashed(spec)  # the payload shards were fingerprinted with before boxes existed
    assert _hashed(replace(spec, phrase_boxes={"a red cube": [0, 0, 1, 1]}))["phrase_boxes"]


def test_a_towers_job_with_both_towers_frozen_is_refused() -> None:
    from training.config_loader import ConfigError

    with pytest.raises(ConfigError, match="model.freeze=both freezes them both"):
        load_config(PRETRAIN, ["model.freeze=both"])
