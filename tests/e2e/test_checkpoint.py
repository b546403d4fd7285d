"""Checkpoints: the resolver never picks a partial one, pruning, the fresh-start guard, no-pickle loading, and an
exact resume on 2 gloo ranks (same losses, same samples, every rank's reader position)."""

from __future__ import annotations

import errno
import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkpoint_pieces import _Counter, _TextFile
from tiny_config import TINY, tiny_overrides

from cluster.root_config import load_config
from shards.format import shard_name
from training.checkpoint import layout
from training.checkpoint.checkpointer import fresh_start_conflict
from training.checkpoint.pruning import prune
from training.trainer.state import TrainState


def _fake_checkpoint(run_dir: Path, step: int, complete: bool) -> Path:
    path = layout.checkpoint_dir(run_dir, step)
    (path / layout.DEEPSPEED).mkdir(parents=True)
    (path / layout.TRAINER_STATE).write_text("{}")
    if complete:
        layout.mark_complete(path)
    return path


def test_resolver_skips_partial_checkpoints_and_a_stale_latest(tmp_path):
    run_dir = tmp_path / "run"
    assert layout.latest_complete(run_dir) is None
    _fake_checkpoint(run_dir, 2, complete=True)
    layout.update_latest_pointer(run_dir, 2)
    _fake_checkpoint(run_dir, 4, complete=False)  # a kill during the write: everything but the marker
    assert layout.latest_complete(run_dir) == (2, layout.checkpoint_dir(run_dir, 2))
    (layout.checkpoints_root(run_dir) / layout.LATEST).write_text("step_00000004\n")  # names the incomplete one
    assert layout.latest_complete(run_dir)[0] == 2
    (layout.checkpoints_root(run_dir) / layout.LATEST).write_text("step_00000009\n")  # names a missing one
    assert layout.latest_complete(run_dir)[0] == 2
    with pytest.raises(RuntimeError, match="incomplete"):
        layout.update_latest_pointer(run_dir, 4)


def test_prune_keeps_the_newest_complete_ones(tmp_path):
    run_dir = tmp_path / "run"
    for step in (1, 2, 3, 4):
        _fake_checkpoint(run_dir, step, complete=True)
    _fake_checkpoint(run_dir, 5, complete=False)  # newer than every complete one: may still be being written
    shutil_left = _fake_checkpoint(run_dir, 0, complete=False)  # older debris of a crash
    prune(run_dir, keep=2)
    assert [step for step, _ in layout.complete_checkpoints(run_dir)] == [3, 4]
    assert layout.checkpoint_dir(run_dir, 5).is_dir() and not shutil_left.exists()


def test_fresh_start_refuses_to_clobber_a_run(tmp_path):
    config = load_config(TINY, [f"cluster.storage_path={tmp_path}", "cluster.run_name=r", "checkpoint.resume=false"])
    assert fresh_start_conflict(config.run_dir, config.checkpoint.resume) is None
    _fake_checkpoint(config.run_dir, 3, complete=False)
    message = fresh_start_conflict(config.run_dir, config.checkpoint.resume)
    assert message and "cluster.run_name" in message and "step_00000003" in message
    resumed = load_config(TINY, [f"cluster.storage_path={tmp_path}", "cluster.run_name=r"])
    assert fresh_start_conflict(resumed.run_dir, resumed.checkpoint.resume) is None


def test_train_entry_exits_2_instead_of_clobbering(tmp_path):
    run_dir = tmp_path / "runs" / "old"
    _fake_checkpoint(run_dir, 5, complete=True)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    script = Path(TINY).parents[1] / "launch" / "train.py"
    overrides = [f"cluster.storage_path={tmp_path / 'runs'}", "cluster.run_name=old", "checkpoint.resume=false"]
    done = subprocess.run(
        [sys.executable, str(script), "--config", str(TINY), *overrides], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2 and "checkpoint.resume=false" in done.stderr and "step_00000005" in done.stderr
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_checkpointer_saves_named_pieces_and_loads_each_back(tmp_path):
    from training.checkpoint.checkpointer import Checkpointer

    train, reader, text = TrainState(step=5, samples_seen=40), _Counter(11), _TextFile("weights")
    saver = Checkpointer(tmp_path, keep=2, files={"file": text}, per_rank={"reader": reader}, per_run={"train": train})
    path = saver.save(5)
    assert layout.is_complete(path) and layout.latest_complete(tmp_path) == (5, path)
    saved = json.loads((path / layout.TRAINER_STATE).read_text())
    assert saved == {
        "version": 1,
        "world_size": 1,
        "train": {"step": 5, "samples_seen": 40, "skipped_steps": 0, "consecutive_skips": 0, "data_digest": ""},
        "ranks": [{"reader": {"value": 11}}],
    }  # the layout every earlier checkpoint has: they load back the same way

    fresh = TrainState(), _Counter(), _TextFile()
    loader = Checkpointer(
        tmp_path, 2, files={"file": fresh[2]}, per_rank={"reader": fresh[1]}, per_run={"train": fresh[0]}
    )
    loader.load(path)
    assert (fresh[0].step, fresh[0].samples_seen, fresh[1].value, fresh[2].text) == (5, 40, 11, "weights")

    greedy = Checkpointer(tmp_path, 2, files={}, per_rank={"reader": _Counter(), "rng": _Counter()}, per_run={})
    with pytest.raises(ValueError, match=r"lacks the piece\(s\) \['rng'\]"):
        greedy.load(path)
    with pytest.raises(ValueError, match="may not be named"):
        Checkpointer(tmp_path, 2, files={}, per_rank={}, per_run={"ranks": _Counter()})
    for step in (6, 7):
        saver.save(step)
    assert [step for step, _ in layout.complete_checkpoints(tmp_path)] == [6, 7]  # keep=2 pruned step 5


class _Payload:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_engine_loader_never_unpickles_arbitrary_objects(tmp_path):
    from training.engine.deepspeed_engine import safe_checkpoint_engine

    path = tmp_path / "evil.pt"
    torch.save({"module": {}, "payload": _Payload()}, path)
    loader = safe_checkpoint_engine(None)
    with pytest.raises(pickle.UnpicklingError):
        loader.load(str(path))
    torch.save({"module": {"w": torch.ones(2)}, "global_steps": 3}, path)
    assert loader.load(str(path))["global_steps"] == 3


def _resume_ranks(rank: int, world: int, overrides: list[str]) -> dict:
    from shards.stream.reader import build_reader
    from training.engine.deepspeed_engine import build_engine, deepspeed_config
    from training.model.weights import load_model_weights
    from training.objectives.context_cir import ConTextObjective
    from training.trainer.loop import train_step
    from training.trainer.worker import build_checkpointer, seed_everything

    config = load_config(TINY, overrides)
    cpu = torch.device("cpu")

    def build():
        seed_everything(0)
        objective = ConTextObjective(config.model, config.loss)
        engine, _, _ = build_engine(objective, config.optim, deepspeed_config(config.deepspeed, config.batch, False))
        reader = build_reader(config.data, config.model.backbone, config.train.micro_batch, rank, world)
        seed_everything(1 + rank)
        return objective, engine, reader

    def steps(engine, batches, count: int) -> list[list]:
        trace = []
        for _ in range(count):
            micro = [next(batches) for _ in range(config.accumulation_steps)]
            result = train_step(engine, micro, cpu)
            trace.append([result.metrics["loss"], result.lr, [key for batch in micro for key in batch["keys"]]])
        return trace

    objective, engine, reader = build()
    batches = iter(reader)
    before = steps(engine, batches, 2)
    saved = build_checkpointer(config, engine, objective.model, reader, TrainState(step=2, samples_seen=32)).save(2)
    after = steps(engine, batches, 3)
    reader.close()

    objective, engine, reader = build()  # a fresh worker: new weights, reader at the start
    step, path = layout.latest_complete(config.run_dir)
    state = TrainState()
    build_checkpointer(config, engine, objective.model, reader, state).load(path)
    weights_match = path == saved
    if rank == 0:  # model.safetensors holds exactly the weights the engine state restored
        probe = ConTextObjective(config.model, config.loss).model
        load_model_weights(probe, saved / layout.WEIGHTS)
        restored = objective.model.state_dict()
        weights_match &= all(torch.equal(value, restored[name]) for name, value in probe.state_dict().items())
    resumed = steps(engine, iter(reader), 3)
    reader.close()

    # model.init_from: a new run starts from the saved weights only (fresh step, schedule, Adam and data)
    from training.monitor.run_monitor import read_metrics
    from training.trainer.worker import train_worker

    init_config = load_config(
        TINY, [*overrides, "cluster.run_name=init", f"model.init_from={saved / layout.WEIGHTS}", "train.steps=1"]
    )
    init_state = train_worker(init_config)
    first = read_metrics(init_config.run_dir)[1] if rank == 0 else {"loss": None, "lr": None, "digest": None}
    return {
        "before": before,
        "after": after,
        "resumed": resumed,
        "state": [state.step, state.samples_seen],
        "weights": weights_match,
        "init": [init_state.step, first["loss"], first["lr"]],
    }


@pytest.mark.slow
def test_resume_continues_exactly_on_two_ranks(tmp_path):
    from dist_harness import run_ranks
    from shard_fixtures import write_shard_set

    write_shard_set(tmp_path / "shards", [20, 20, 20, 20])
    results = run_ranks(_resume_ranks, 2, (tiny_overrides(tmp_path, tmp_path / "shards"),))
    run_dir = tmp_path / "runs" / "test"
    checkpoint = layout.checkpoint_dir(run_dir, 2)
    assert layout.is_complete(checkpoint) and layout.read_latest_pointer(run_dir) == "step_00000002"
    for piece in (layout.WEIGHTS, layout.CONFIG, layout.TRAINER_STATE):
        assert (checkpoint / piece).is_file(), piece
    for state_file in (checkpoint / layout.DEEPSPEED).glob("*.pt"):
        torch.load(state_file, weights_only=True)  # DeepSpeed's files hold nothing that needs unpickling
    trainer_state = json.loads((checkpoint / layout.TRAINER_STATE).read_text())
    assert trainer_state["train"]["step"] == 2 and trainer_state["world_size"] == 2
    assert [entry["reader"]["rank"] for entry in trainer_state["ranks"]] == [0, 1]
    assert all(entry["reader"]["step"] == 4 for entry in trainer_state["ranks"])  # 2 steps x 2 micro-batches
    for result in results:
        assert result["state"] == [2, 32]
        assert result["resumed"] == result["after"]  # losses, lrs and sample keys, bit for bit
    assert results[0]["after"][0][2] != results[1]["after"][0][2]  # the ranks read different samples
    assert results[0]["weights"]
    init_step, init_loss, init_lr = results[0]["init"]
    scratch_loss, scratch_lr, _ = results[0]["before"][0]
    assert init_step == 1 and init_lr == scratch_lr  # fresh step count and schedule
    assert init_loss != scratch_loss  # same first batches, but the trained weights
    assert not layout.checkpoints_root(tmp_path / "runs" / "init").joinpath("step_00000002").exists()


class _FullDisk:
    """A file piece that writes part of its file, then finds the disk full."""

    def save(self, directory: Path, rank: int) -> None:
        (directory / "weights.bin").write_bytes(b"\0" * 4096)
        raise OSError(errno.ENOSPC, "No space left on device")

    def load(self, directory: Path) -> None:
        raise AssertionError("never loaded")


def test_a_full_disk_removes_the_partial_checkpoint_and_says_what_is_free(tmp_path):
    from training.checkpoint.checkpointer import Checkpointer, CheckpointWriteError

    saver = Checkpointer(tmp_path, keep=2, files={"text": _TextFile("a")}, per_rank={}, per_run={"train": TrainState()})
    saver.save(2)
    failing = Checkpointer(tmp_path, keep=2, files={"engine": _FullDisk()}, per_rank={}, per_run={})
    with pytest.raises(
        CheckpointWriteError, match=r"'engine' piece of checkpoint .*step_00000004 \(No space left"
    ) as info:
        failing.save(4)
    assert info.value.errno == errno.ENOSPC and "GiB free of" in str(info.value)
    assert not layout.checkpoint_dir(tmp_path, 4).exists()  # nothing partial left to fill the disk
    assert layout.latest_complete(tmp_path)[0] == 2


def _submit(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    script = Path(TINY).parents[1] / "launch" / "train.py"
    arguments = [f"cluster.storage_path={tmp_path / 'runs'}", "cluster.run_name=r", f"data.shards_dir={tmp_path / 's'}"]
    command = [sys.executable, str(script), "--config", str(TINY), *arguments, *overrides]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(("written_by", "submitted"), [(2, 1), (1, 2)])
def test_resuming_with_another_worker_count_stops_before_ray_starts(tmp_path, written_by, submitted):
    """What would fail inside every retried worker group is found on the driver: one line per problem, exit 2."""
    from shard_fixtures import write_shard_set

    write_shard_set(tmp_path / "s", [8])
    path = _fake_checkpoint(tmp_path / "runs" / "r", 4, complete=True)
    (path / layout.TRAINER_STATE).write_text(json.dumps({"version": 1, "world_size": written_by, "ranks": []}))
    done = _submit(
        tmp_path, f"cluster.num_workers={submitted}", "train.micro_batch=4", f"train.global_batch={8 * submitted}"
    )
    assert done.returncode == 2, done.stderr
    assert f"written by {written_by} worker(s)" in done.stderr and f"cluster.num_workers={written_by}" in done.stderr
    assert "model.init_from=" in done.stderr and "started a local Ray" not in done.stdout


def test_a_missing_shard_or_an_unreadable_checkpoint_stops_before_ray_starts(tmp_path):
    from shard_fixtures import write_shard_set

    write_shard_set(tmp_path / "s", [8, 8])
    (tmp_path / "s" / shard_name(1)).unlink()
    path = _fake_checkpoint(tmp_path / "runs" / "r", 4, complete=True)
    (path / layout.TRAINER_STATE).write_text("{not json")
    done = _submit(tmp_path)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 2 and all(line.startswith("config error:") for line in lines)
    assert "trainer_state.json is unreadable" in lines[0] and "step_00000004" in lines[0]
    assert f"are missing: {shard_name(1)}" in lines[1]
