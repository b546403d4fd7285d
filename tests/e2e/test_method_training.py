"""The other methods train on the engine (DESIGN section 13): phi (image and text objectives) and TisCIR (msmp,
then fgia from it) run the real training worker on two gloo ranks under DeepSpeed, with frozen towers, and resume
exactly: a run stopped at its checkpoint and resumed ends with the weights and per-step losses of an unbroken one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cluster.root_config import load_config
from training.checkpoint import layout

REPO_ROOT = Path(__file__).resolve().parents[2]
VARIANTS = {
    "phi_image": ("phi_tiny.yaml", ["methods.phi.objective=image"]),
    "phi_text": ("phi_tiny.yaml", ["methods.phi.objective=text"]),
    "tiscir_msmp": ("tiscir_msmp_tiny.yaml", []),
    "tiscir_fgia": ("tiscir_tiny.yaml", []),
}


def _overrides(tmp_path: Path, shards: Path, run: str, steps: int) -> list[str]:
    values = {
        "data.shards_dir": shards,
        "data.loader_workers": 0,
        "data.shuffle_buffer": 16,
        "model.weights_file": "null",
        "model.init_from": "null",
        "train.micro_batch": 4,
        "train.global_batch": 16,
        "train.steps": steps,
        "cluster.num_workers": 2,
        "cluster.storage_path": tmp_path / "runs",
        "cluster.run_name": run,
        "checkpoint.every_steps": 2,
        "optim.warmup_steps": 1,
        "logging.every": 1,
    }
    return [f"{key}={value}" for key, value in values.items()]


def _train_ranks(rank: int, world: int, tmp_path: Path, shards: Path) -> dict:
    from safetensors.torch import load_file

    from training.monitor.run_monitor import read_metrics
    from training.trainer.worker import train_worker

    results = {}
    msmp_weights = None
    for name, (config_name, extra) in VARIANTS.items():
        runs = {}
        for run, plan in (("whole", [4]), ("broken", [2, 4])):
            for steps in plan:
                overrides = _overrides(tmp_path, shards, f"{name}_{run}", steps) + extra
                if name == "tiscir_fgia":
                    overrides.append(f"model.init_from={msmp_weights}")
                config = load_config(REPO_ROOT / "configs" / config_name, overrides)
                state = train_worker(config, console=False)
            runs[run] = (state.step, config.run_dir)
        if name == "tiscir_msmp":  # the fgia stage starts from these (same path on every rank)
            msmp_weights = layout.checkpoint_dir(runs["whole"][1], 4) / layout.WEIGHTS
        if rank != 0:
            continue
        (step_a, dir_a), (step_b, dir_b) = runs["whole"], runs["broken"]
        weights_a = load_file(str(layout.checkpoint_dir(dir_a, 4) / layout.WEIGHTS))
        weights_b = load_file(str(layout.checkpoint_dir(dir_b, 4) / layout.WEIGHTS))
        losses_a = [read_metrics(dir_a)[step]["loss"] for step in range(1, 5)]
        losses_b = [read_metrics(dir_b)[step]["loss"] for step in range(1, 5)]
        trained = [key for key in weights_a if not key.startswith("backbone.")]
        start = load_file(str(layout.checkpoint_dir(dir_a, 2) / layout.WEIGHTS))
        results[name] = {
            "steps": [step_a, step_b],
            "equal": all(torch.equal(weights_a[key], weights_b[key]) for key in weights_a),
            "losses": [losses_a, losses_b],
            "heads_moved": any(not torch.equal(start[key], weights_a[key]) for key in trained),
            "towers_fixed": all(torch.equal(start[key], weights_a[key]) for key in weights_a if key.startswith("back")),
        }
    return results


@pytest.mark.slow
def test_phi_and_tiscir_train_on_the_engine_and_resume_exactly(tmp_path):
    from dist_harness import run_ranks
    from shard_fixtures import write_shard_set

    write_shard_set(tmp_path / "shards", [24, 24, 24, 24])
    results = run_ranks(_train_ranks, 2, (tmp_path, tmp_path / "shards"))[0]
    assert set(results) == set(VARIANTS)
    for name, result in results.items():
        assert result["steps"] == [4, 4], name
        assert result["equal"], f"{name}: the resumed run's weights differ from the unbroken run's"
        assert result["losses"][0] == result["losses"][1], name
        assert result["heads_moved"] and result["towers_fixed"], name


def test_a_missing_stage_one_is_found_before_ray_starts(tmp_path):
    from cluster.runtime.preflight import startup_problems

    config = load_config(REPO_ROOT / "configs" / "tiscir_tiny.yaml", [f"cluster.storage_path={tmp_path}"])
    problems = startup_problems(config)
    assert any(
        line.startswith("model.init_from: runs/tiscir_msmp_tiny/")
        and "train configs/tiscir_msmp_tiny.yaml first" in line
        for line in problems
    ), problems
