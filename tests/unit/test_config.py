"""Config loading: every shipped YAML parses, and bad input stops every entry script with exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cluster.root_config import RootConfig, load_config
from training.config_loader import ConfigError, to_yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO_ROOT / "configs").glob("*.yaml"))
ENTRY_SCRIPTS = ["train.py", "build_shards.py", "eval.py"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path) -> None:
    config = load_config(path)
    assert isinstance(config, RootConfig)
    assert (
        config.train.global_batch == config.accumulation_steps * config.train.micro_batch * config.cluster.num_workers
    )
    # The resolved form saved with checkpoints reloads to the same config.
    assert load_config_text(to_yaml(config)) == config


def test_paper_settings_in_vith() -> None:
    config = load_config(REPO_ROOT / "configs" / "vith.yaml")
    assert (config.model.backbone, config.model.pretrained) == ("ViT-H-14", "laion2b_s32b_b79k")
    assert (config.model.fusion_layers, config.model.fusion_heads) == (4, 8)
    assert (config.loss.temperature, config.loss.lambda_cc, config.data.noun_phrases.max_nps) == (0.07, 0.08, 10)
    assert (config.optim.lr, config.optim.min_lr, config.optim.weight_decay) == (2e-5, 2e-7, 1e-2)
    assert (config.optim.warmup_steps, config.train.global_batch, config.train.steps) == (500, 256, 35_000)
    assert [source.name for source in config.data.sources] == ["cirr", "cirr_r", "lasco", "hotel_cir"]


def test_overrides_apply_after_the_file() -> None:
    config = load_config(REPO_ROOT / "configs" / "tiny.yaml", ["optim.lr=2e-5", "cluster.num_workers=1"])
    assert config.optim.lr == 2e-5 and config.cluster.num_workers == 1


def load_config_text(text: str) -> RootConfig:
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "saved.yaml"
        path.write_text(text)
        return load_config(path)


def _set(tree: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[leaf] = value


# name -> (edits to configs/tiny.yaml, overrides, key path the error must name)
BAD_CONFIGS = {
    "misspelled_key": ({"train.stepz": 3}, [], "train.stepz"),
    "misspelled_deepspeed_key": ({"deepspeed.zero_stag": 2}, [], "deepspeed.zero_stag"),
    "wrong_type": ({"optim.lr": "fast"}, [], "optim.lr"),
    "missing_required": ({"data.shards_dir": None}, [], "data.shards_dir"),
    "batch_not_divisible": ({"train.global_batch": 10, "train.micro_batch": 4}, [], "train.global_batch"),
    "bad_override": ({}, ["deepspeed.precison=bf16"], "deepspeed.precison"),
}


def _write_bad(directory: Path, name: str) -> tuple[Path, list[str], str]:
    edits, overrides, key = BAD_CONFIGS[name]
    tree = yaml.safe_load((REPO_ROOT / "configs" / "tiny.yaml").read_text())
    for dotted, value in edits.items():
        if value is None:
            *parents, leaf = dotted.split(".")
            node = tree
            for part in parents:
                node = node[part]
            del node[leaf]
        else:
            _set(tree, dotted, value)
    path = directory / "bad.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path, overrides, key


@pytest.mark.parametrize("name", sorted(BAD_CONFIGS))
def test_bad_config_raises_naming_the_key(tmp_path: Path, name: str) -> None:
    path, overrides, key = _write_bad(tmp_path, name)
    with pytest.raises(ConfigError) as error:
        load_config(path, overrides)
    assert key in str(error.value)
    assert str(path) in str(error.value)


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("script", ENTRY_SCRIPTS)
@pytest.mark.parametrize("name", sorted(BAD_CONFIGS))
def test_entry_script_exits_2_fast_and_touches_nothing(tmp_path: Path, script: str, name: str) -> None:
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    path, overrides, key = _write_bad(config_dir, name)
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    # Ray, DeepSpeed and every writer resolve their temp/home/cwd paths into the sandbox: an empty sandbox
    # afterwards means no Ray session started and no file was written.
    env = dict(os.environ, TMPDIR=str(sandbox), HOME=str(sandbox), RAY_TMPDIR=str(sandbox))
    env.pop("RAY_ADDRESS", None)
    extra = ["--checkpoint", str(sandbox / "none")] if script == "eval.py" else []
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "launch" / script), "--config", str(path), *extra, *overrides],
        cwd=sandbox,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 2, result.stderr
    assert key in result.stderr
    assert elapsed < 5.0, f"{script} took {elapsed:.1f}s to reject the config"
    assert _tree(sandbox) == [], f"{script} wrote {_tree(sandbox)}"


@pytest.mark.parametrize("name", ["vith.yaml", "vith"])
def test_a_bare_config_name_finds_the_shipped_config(tmp_path: Path, name: str) -> None:
    """As users type it, from any working directory: `--config vith.yaml` and `--config vith`."""
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "launch" / "train.py"), "--config", name, "--dry-run"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert f"{REPO_ROOT / 'configs' / 'vith.yaml'}: valid; 8 worker(s)" in result.stdout
    assert "backbone: ViT-H-14" in result.stdout
    assert list(tmp_path.iterdir()) == []  # a dry run writes nothing


def test_a_local_file_wins_over_a_shipped_name_and_a_missing_one_lists_the_configs(tmp_path: Path) -> None:
    from cluster.cli import find_config

    (tmp_path / "vith.yaml").write_text("train: {steps: 3}\n")
    previous = Path.cwd()
    os.chdir(tmp_path)
    try:
        assert find_config("vith.yaml") == Path("vith.yaml")
        assert find_config("vitb") == REPO_ROOT / "configs" / "vitb.yaml"
        with pytest.raises(
            ConfigError,
            match="shipped configs .*: generate_synthetic, phi_tiny, phi_vitl, tiny, tiny_pretrain, tiscir_msmp_tiny, "
            "tiscir_tiny, vitb, vith, vitl",
        ):
            find_config("vitz")
        with pytest.raises(ConfigError, match="not found: missing/vith.yaml"):
            find_config("missing/vith.yaml")  # a path, not a bare name: never redirected
    finally:
        os.chdir(previous)


def test_renamed_keys_name_their_new_place(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"eval.synthetic_root is now eval.datasets.synthetic.root"):
        load_config(REPO_ROOT / "configs" / "tiny.yaml", ["eval.synthetic_root=data/synthetic"])
