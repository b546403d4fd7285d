"""The driver's lease on its run: workers publish checkpoints only while the driver that started them owns the run."""

from __future__ import annotations

import json
import subprocess
import sys
from functools import partial

import pytest
from checkpoint_pieces import _TextFile

from training.checkpoint import layout, owner_lease
from training.checkpoint.checkpointer import Checkpointer
from training.trainer.state import TrainState


def _rewrite(run_dir, **changes) -> None:
    path = owner_lease.owner_path(run_dir)
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def test_a_live_driver_owns_its_run_until_it_releases_it(tmp_path):
    with owner_lease.held(tmp_path) as token:
        held = json.loads(owner_lease.owner_path(tmp_path).read_text())
        assert held["token"] == token and held["lease_seconds"] == owner_lease.LEASE_SECONDS
        owner_lease.check(tmp_path, token)  # this process is the owner and runs
        assert "took the run over" in owner_lease.gone_reason(tmp_path, "an older driver's token")
    assert not owner_lease.owner_path(tmp_path).exists()
    assert "is gone" in owner_lease.gone_reason(tmp_path, token)


def test_a_dead_driver_is_noticed_at_once_on_its_machine_and_after_the_lease_elsewhere(tmp_path):
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    with owner_lease.held(tmp_path) as token:
        heartbeat = json.loads(owner_lease.owner_path(tmp_path).read_text())["heartbeat"]
        _rewrite(tmp_path, pid=int(ended.stdout))  # the same pid namespace: its pid is checked, not its heartbeat
        with pytest.raises(owner_lease.OwnerGone, match=f"driver pid {int(ended.stdout)} on .* has exited"):
            owner_lease.check(tmp_path, token)
        _rewrite(tmp_path, pid_namespace="another node")  # a worker that cannot see the driver's pid
        assert owner_lease.gone_reason(tmp_path, token, now=heartbeat + 60) is None  # slow storage: still trusted
        late = owner_lease.gone_reason(tmp_path, token, now=heartbeat + owner_lease.LEASE_SECONDS + 1)
        assert "has not renewed its lease for 121 s" in late


def test_a_checkpoint_is_not_published_once_the_owner_is_gone(tmp_path):
    with owner_lease.held(tmp_path) as token:
        saver = Checkpointer(
            tmp_path,
            keep=2,
            files={"text": _TextFile("a")},
            per_rank={},
            per_run={"train": TrainState()},
            may_publish=partial(owner_lease.check, tmp_path, token),
        )
        saver.save(2)
        _rewrite(tmp_path, token="a later submission")
        with pytest.raises(owner_lease.OwnerGone, match="took the run over"):
            saver.save(4)
    assert [step for step, _ in layout.complete_checkpoints(tmp_path)] == [2]
    assert layout.read_latest_pointer(tmp_path) == "step_00000002"


def test_an_older_driver_never_takes_its_run_back_from_a_newer_one(tmp_path):
    import time

    with owner_lease.held(tmp_path, lease_seconds=0.5) as older:
        with owner_lease.held(tmp_path, lease_seconds=0.5) as newer:
            time.sleep(0.3)  # several renewal beats of the older driver's thread
            assert json.loads(owner_lease.owner_path(tmp_path).read_text())["token"] == newer
            owner_lease.check(tmp_path, newer)
            with pytest.raises(owner_lease.OwnerGone, match="took the run over"):
                owner_lease.check(tmp_path, older)
        assert not owner_lease.owner_path(tmp_path).exists()  # released by the newer driver
    assert not owner_lease.owner_path(tmp_path).exists()  # and the older one did not write it back
