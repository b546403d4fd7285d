"""Errors that a restart would meet again are not retried by Ray (issue 14, defect 3).

The policy is checked on hand-made `WorkerGroupError`s, the way Ray's controller builds them; one test fails if Ray
changes how `fit()` hands its failure policy to the controller (our trainer swaps it there). End to end, a run whose
latest checkpoint has a corrupt DeepSpeed engine file, with `cluster.max_failures=3`, exits 2 after one attempt with
one `train error:` line; a killed worker is still retried (`test_train_e2e.py`).
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
from shard_fixtures import write_shard_set

from training.checkpoint import layout
from training.checkpoint.checkpointer import CheckpointWriteError
from training.checkpoint.owner_lease import OwnerGone
from training.checkpoint.pieces import CheckpointLoadError
from training.config_loader import ConfigError
from training.errors import PermanentError
from training.trainer.loop import NonFiniteAbort
from training.trainer.worker import WorldSizeMismatch

REPO_ROOT = Path(__file__).resolve().parents[2]


def _group_error(failures: dict[int, Exception]):
    from ray.train import WorkerGroupError

    return WorkerGroupError("worker errors", worker_failures=failures)


def test_a_permanent_error_on_any_rank_is_raised_at_once_and_others_are_retried():
    from ray.train import FailureConfig
    from ray.train.v2._internal.execution.failure_handling import FailureDecision

    from cluster.runtime.failure_policy import PermanentFirst, permanent_error

    policy = PermanentFirst(FailureConfig(max_failures=3))
    full_disk = CheckpointWriteError(errno.ENOSPC, "rank 0 could not write the 'engine' piece")
    # Rank 1 failed only because rank 0 left the collective: the permanent cause decides.
    collateral = RuntimeError("Connection closed by peer")
    assert policy.make_decision(_group_error({1: collateral, 0: full_disk})) == FailureDecision.RAISE
    assert permanent_error(_group_error({1: collateral, 0: full_disk})) is full_disk
    killed = RuntimeError("The actor died unexpectedly")
    decisions = [policy.make_decision(_group_error({0: killed})) for _ in range(4)]
    assert decisions == [FailureDecision.RETRY] * 3 + [FailureDecision.RAISE]  # Ray's own max_failures budget


def test_permanent_errors_keep_their_class_and_message_through_pickling():
    """Ray ships each worker's exception to the controller and the driver by pickling it."""
    errors = [
        CheckpointWriteError(errno.ENOSPC, "no space"),
        CheckpointLoadError("unreadable engine state"),
        OwnerGone("the driver has exited"),
        ConfigError("model.backbone: unknown"),
        WorldSizeMismatch("2 ranks, cluster.num_workers=1"),
        NonFiniteAbort("3 non-finite steps"),
    ]
    for error in errors:
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error) and isinstance(copy, PermanentError) and str(copy) == str(error)
    assert isinstance(errors[0], OSError) and isinstance(errors[1], ValueError)  # existing handlers still match


def test_fit_hands_our_policy_to_the_controller():
    """Ray has no public hook for the policy; this fails if `fit()` stops passing `failure_policy` where we swap it."""
    import inspect

    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.v2._internal.execution.controller.controller import TrainController
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    from cluster.runtime.failure_policy import PermanentFirst, PermanentFirstTorchTrainer

    assert "failure_policy" in inspect.signature(TrainController.__init__).parameters
    trainer = PermanentFirstTorchTrainer(
        lambda: None,
        scaling_config=ScalingConfig(num_workers=1),
        run_config=RunConfig(failure_config=FailureConfig(max_failures=3)),
    )
    with (
        mock.patch("ray.train.v2.api.data_parallel_trainer.ObjectRefWrapper"),
        mock.patch.object(DataParallelTrainer, "_initialize_and_run_controller") as run_controller,
    ):
        run_controller.return_value = mock.Mock(error=None)
        trainer.fit()
    policy = run_controller.call_args.kwargs["failure_policy"]
    assert isinstance(policy, PermanentFirst) and policy.failure_config.max_failures == 3


def _corrupt_checkpoint(run_dir: Path, step: int) -> Path:
    """A complete checkpoint whose trainer state is sound (the driver's preflight reads it) but whose DeepSpeed
    engine file is cut short, as a disk that filled up under an older version of the writer left it."""
    path = layout.checkpoint_dir(run_dir, step)
    (path / layout.DEEPSPEED).mkdir(parents=True)
    (path / layout.DEEPSPEED / "mp_rank_00_model_states.pt").write_bytes(b"PK\x03\x04 cut short")
    state = {"version": 1, "world_size": 1, "train": {"step": step}, "ranks": [{"reader": {}, "rng": {}}]}
    (path / layout.TRAINER_STATE).write_text(json.dumps(state))
    layout.mark_complete(path)
    layout.update_latest_pointer(run_dir, step)
    return path


@pytest.mark.slow
def test_a_corrupt_engine_file_ends_the_job_after_one_attempt_with_one_line(tmp_path):
    from cluster.runtime.resources import read_placement

    write_shard_set(tmp_path / "shards", [24] * 2)
    run_dir = tmp_path / "runs" / "corrupt"
    corrupt = _corrupt_checkpoint(run_dir, step=4)
    command = [
        sys.executable, "launch/train.py", "--config", "configs/tiny.yaml",
        "data.loader_workers=0", f"data.shards_dir={tmp_path / 'shards'}", "data.shuffle_buffer=8",
        "model.fusion_layers=1", "train.micro_batch=4", "train.global_batch=4", "train.steps=8",
        "cluster.num_workers=1", "cluster.max_failures=3",
        f"cluster.storage_path={tmp_path / 'runs'}", "cluster.run_name=corrupt",
    ]  # fmt: skip
    driver = subprocess.Popen(
        command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = driver.communicate(timeout=240)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, 9)  # its own session: the driver and the local Ray it started
            driver.wait()
    assert driver.returncode == 2, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("train error:")]
    assert len(errors) == 1 and f"{corrupt / layout.DEEPSPEED}: the DeepSpeed engine state is unreadable" in errors[0]
    assert "move step_00000004 out of" in errors[0]
    # No traceback: neither the driver's own nor Ray's reports of the worker's error. (Ray's PlacementGroupCleaner
    # prints tracebacks of its own when other Rays run on the machine: that is console noise of another defect.)
    reports = [line for line in (stdout + stderr).splitlines() if "PlacementGroupCleaner" not in line]
    assert not [line for line in reports if "Traceback" in line or "WorkerGroupError" in line], stderr[-3000:]
    assert len(read_placement(run_dir)) == 1  # one attempt of one worker: Ray did not restart the group
