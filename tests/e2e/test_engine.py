"""The DeepSpeed engine on 2 gloo ranks: real ConText-CIR objective, real shards; non-finite steps are skipped
everywhere without touching parameters or Adam moments, counted, and abort the run when they repeat."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import sys
from pathlib import Path

import pytest
import torch
from poisoned_batches import with_nan_pixels
from tiny_config import TINY, tiny_overrides

from cluster.root_config import load_config
from training.config_loader import ConfigError
from training.engine.deepspeed_engine import deepspeed_config

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_deepspeed_config_from_the_root_config():
    config = load_config(TINY, ["train.global_batch=64", "train.micro_batch=8", "cluster.num_workers=2"])
    ds = deepspeed_config(config.deepspeed, config.batch, config.use_gpu)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (
        64,
        8,
        4,
    )
    assert ds["gradient_clipping"] == 1.0 and ds["zero_optimization"] == {"stage": 0}
    assert "torch_autocast" not in ds  # fp32 on CPU
    gpu = load_config(
        TINY,
        ["cluster.use_gpu=true", "deepspeed.zero_stage=2", "deepspeed.offload_optimizer=true", "cluster.num_workers=1"],
    )
    ds = deepspeed_config(gpu.deepspeed, gpu.batch, gpu.use_gpu)
    # bf16 matmuls, but gradients reduced in fp32: no module is tagged for a bf16 reduction.
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    assert ds["communication_data_type"] == "fp32"
    assert ds["zero_optimization"]["stage"] == 2 and ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["reduce_bucket_size"] == 50_000_000  # ~0.9 GB of buckets with overlap_comm
    halves = deepspeed_config(dataclasses.replace(gpu.deepspeed, reduce_dtype="bf16"), gpu.batch, True)
    assert (
        halves["communication_data_type"] == "bf16" and "lower_precision_safe_modules" not in halves["torch_autocast"]
    )
    with pytest.raises(ValueError, match="world size"):
        deepspeed_config(config.deepspeed, config.train.geometry(world_size=3), False)
    with pytest.raises(ConfigError, match="global_batch"):
        load_config(TINY, ["train.global_batch=60", "train.micro_batch=8", "cluster.num_workers=2"])


def _snapshot(engine) -> dict[str, torch.Tensor]:
    state = {f"param/{name}": p.detach().clone() for name, p in engine.module.named_parameters()}
    for index, (parameter, slots) in enumerate(engine.basic_optimizer.state.items()):
        del parameter
        for key, value in slots.items():
            state[f"adam/{index}/{key}"] = value.detach().clone() if torch.is_tensor(value) else torch.tensor(value)
    return state


def _same(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> bool:
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


class _PoisonedReader:
    """Wraps the real reader and puts a NaN pixel into every batch on one rank (the fault under test)."""

    def __init__(self, reader, rank: int, poisoned_rank: int, backbone: str) -> None:
        self.reader, self.rank, self.poisoned_rank, self.backbone = reader, rank, poisoned_rank, backbone

    def __iter__(self):
        for batch in self.reader:
            if self.rank == self.poisoned_rank:
                batch = with_nan_pixels(batch, self.backbone, (0, 0, 0, 0))
            yield batch

    def state_dict(self):
        return self.reader.state_dict()


def _nan_skip_ranks(rank: int, world: int, overrides: list[str]) -> dict:
    from shards.stream.reader import build_reader
    from training.objectives.context_cir import ConTextObjective
    from training.trainer.loop import LoopContext, NonFiniteAbort, run, train_step
    from training.trainer.state import TrainState
    from training.trainer.worker import build_checkpointer, build_monitor, seed_everything

    config = load_config(TINY, overrides)
    seed_everything(0)
    objective = ConTextObjective(config.model, config.loss)
    from training.engine.deepspeed_engine import build_engine

    engine, _, _ = build_engine(objective, config.optim, deepspeed_config(config.deepspeed, config.batch, False))
    reader = build_reader(config.data, config.model.backbone, config.train.micro_batch, rank, world)
    batches = iter(reader)
    cpu = torch.device("cpu")

    def step(poison: bool):
        micro = [next(batches) for _ in range(config.accumulation_steps)]
        if poison and rank == 1:  # the first micro-batch: its NaN gradients sit in the accumulation window
            micro[0] = with_nan_pixels(micro[0], config.model.backbone)
        return train_step(engine, micro, cpu)

    first = step(False)
    before = _snapshot(engine)
    poisoned = step(True)
    untouched = _same(before, _snapshot(engine))
    third = step(False)
    moved = not _same(before, _snapshot(engine))
    adam_steps = {int(slots["step"]) for slots in engine.basic_optimizer.state.values()}
    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in engine.module.parameters())).hexdigest()
    counters = [engine.global_steps, engine.micro_steps, engine.skipped_steps]

    monitor = build_monitor(config, rank, 0, objective.model, cpu)
    poisoned_reader, state = _PoisonedReader(reader, rank, 0, config.model.backbone), TrainState()
    checkpointer = build_checkpointer(config, engine, objective.model, poisoned_reader, state)
    context = LoopContext(engine, poisoned_reader, monitor, checkpointer, config, cpu, state)
    try:
        run(context)
        abort = ""
    except NonFiniteAbort as error:
        abort = str(error)
    finally:
        monitor.close()
    return {
        "skipped": [first.skipped, poisoned.skipped, third.skipped],
        "losses": [first.metrics["loss"], poisoned.metrics["loss"], third.metrics["loss"]],
        "lrs": [first.lr, poisoned.lr, third.lr],
        "untouched": untouched,
        "moved": moved,
        "adam_steps": sorted(adam_steps),
        "counters": counters,
        "digest": digest,
        "abort": abort,
        "abort_state": [context.state.step, context.state.skipped_steps, context.state.consecutive_skips],
    }


@pytest.mark.slow
def test_nan_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    from dist_harness import run_ranks
    from shard_fixtures import write_shard_set

    from training.monitor.run_monitor import read_metrics

    write_shard_set(tmp_path / "shards", [20, 20, 20, 20])
    overrides = tiny_overrides(tmp_path, tmp_path / "shards", **{"train.max_consecutive_skips": 2})
    results = run_ranks(_nan_skip_ranks, 2, (overrides,))
    for result in results:
        assert result["skipped"] == [False, True, False]
        assert result["untouched"], "a skipped step changed parameters or Adam state"
        assert result["moved"], "the step after the skip did not train"
        assert result["adam_steps"] == [2]  # only the applied steps reached AdamW
        assert result["counters"] == [3, 6, 1]  # DeepSpeed: 3 steps, 3 x 2 micro-steps, 1 skipped
        assert math.isnan(result["losses"][1]) and math.isfinite(result["losses"][2])
        assert result["lrs"][2] == result["lrs"][1]  # the schedule does not advance on a skipped step
        assert "2 consecutive steps" in result["abort"] and result["abort_state"] == [2, 2, 2]
    assert results[0]["digest"] == results[1]["digest"]  # ranks hold identical weights
    logged = read_metrics(tmp_path / "runs" / "test")
    assert [logged[s]["skipped"] for s in (1, 2)] == [True, True]
    assert logged[2]["skipped_steps"] == 2 and logged[2]["loss"] is None


def _reduce_dtypes_rank(rank: int, world: int, overrides: list[str]) -> dict:
    from training.engine.deepspeed_engine import build_engine
    from training.objectives.context_cir import ConTextObjective

    config = load_config(TINY, overrides)
    objective = ConTextObjective(config.model, config.loss)
    engine, _, _ = build_engine(objective, config.optim, deepspeed_config(config.deepspeed, config.batch, True))
    tagged = sorted({str(p.comm_dtype) for p in engine.module.parameters() if hasattr(p, "comm_dtype")})
    return {"tagged": tagged, "engine": str(engine.communication_data_type)}


@pytest.mark.slow
def test_bf16_autocast_reduces_gradients_in_fp32_under_zero(tmp_path):
    """DeepSpeed's autocast mode tags Linear/Conv weights for a bf16 reduction; ours tags none (reduce_dtype=fp32)."""
    from dist_harness import run_ranks

    overrides = [
        f"data.shards_dir={tmp_path}",
        "cluster.num_workers=1",
        "deepspeed.zero_stage=2",
        "train.global_batch=32",
    ]
    (result,) = run_ranks(_reduce_dtypes_rank, 1, (overrides,))
    assert result == {"tagged": [], "engine": "torch.float32"}
    (halves,) = run_ranks(_reduce_dtypes_rank, 1, ([*overrides, "deepspeed.reduce_dtype=bf16"],))
    assert halves["tagged"] == ["torch.bfloat16"]


def test_deepspeed_ops_build_into_the_virtualenv_unless_told_otherwise(monkeypatch, tmp_path):
    from training.engine.deepspeed_engine import use_venv_extensions_dir

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "venv"))
    monkeypatch.setattr(sys, "base_prefix", "/usr")
    use_venv_extensions_dir()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(tmp_path / "venv" / "torch_extensions")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/scratch/ops")
    use_venv_extensions_dir()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == "/scratch/ops"
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    monkeypatch.setattr(sys, "prefix", "/usr")  # no virtualenv: torch's own default
    use_venv_extensions_dir()
    assert "TORCH_EXTENSIONS_DIR" not in os.environ
