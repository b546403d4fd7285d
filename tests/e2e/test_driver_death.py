"""A driver that is SIGKILLed takes its private local Ray with it and its workers publish nothing more (issue 14).

`python launch/train.py` without a cluster starts Ray inside the driver. The test starts one in its own session,
records every process in the driver's tree while it trains, kills the driver (only the driver) once the first
checkpoint is published, and then expects every recorded process to be gone within 20 s and no checkpoint to be
published after the kill. Before the fix the workers trained on and Ray's agents lived for up to a minute.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from shard_fixtures import write_shard_set

from training.checkpoint import layout

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
GONE_WITHIN_S = 20.0


def _record_tree(root: psutil.Process, seen: dict[int, psutil.Process]) -> None:
    try:
        for process in root.children(recursive=True):
            seen.setdefault(process.pid, process)
    except psutil.Error:
        pass


def _running(seen: dict[int, psutil.Process]) -> list[str]:
    """The recorded processes still running (psutil tells a reused pid apart by its start time)."""
    running = []
    for process in seen.values():
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                running.append(f"{process.pid} {process.name()}")
        except psutil.Error:
            continue
    return running


def test_a_killed_driver_stops_its_local_ray_and_publishes_no_more_checkpoints(tmp_path):
    write_shard_set(tmp_path / "shards", [24] * 6)
    run_dir = tmp_path / "runs" / "orphaned"
    command = [
        sys.executable, "launch/train.py", "--config", "configs/tiny.yaml",
        "data.loader_workers=0", f"data.shards_dir={tmp_path / 'shards'}", "data.shuffle_buffer=8",
        "model.fusion_layers=1", "train.micro_batch=4", "train.global_batch=4", "train.steps=300",
        "checkpoint.every_steps=2", "checkpoint.keep=2", "logging.image_every=1000",
        "cluster.num_workers=1", f"cluster.storage_path={tmp_path / 'runs'}", "cluster.run_name=orphaned",
    ]  # fmt: skip
    log = open(tmp_path / "driver.log", "w")
    driver = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    seen: dict[int, psutil.Process] = {}
    try:
        root = psutil.Process(driver.pid)
        deadline = time.monotonic() + 180
        while not layout.complete_checkpoints(run_dir):
            assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 180 s"
            _record_tree(root, seen)
            time.sleep(0.1)
        _record_tree(root, seen)
        published_before = [step for step, _ in layout.complete_checkpoints(run_dir)]
        os.kill(driver.pid, signal.SIGKILL)
        killed_at = time.time()
        driver.wait()
        deadline = time.monotonic() + GONE_WITHIN_S
        while _running(seen) and time.monotonic() < deadline:
            time.sleep(0.5)
        survivors = _running(seen)
    finally:
        for process in seen.values():
            try:
                process.kill()  # psutil refuses a pid that was reused since it was recorded
            except psutil.Error:
                pass
        try:
            os.killpg(driver.pid, signal.SIGKILL)  # the driver's own session, should anything remain in it
        except (ProcessLookupError, PermissionError):
            pass
        driver.wait()
        log.close()
    assert len(seen) > 5, "the driver's tree should hold Ray's processes"
    assert not survivors, f"still running {GONE_WITHIN_S:.0f} s after the driver died: {survivors}"
    # Rank 0 checks that its driver lives right before it writes a checkpoint's marker: a check that passed just
    # before the kill may still publish, with the marker written milliseconds after the kill. Half a second covers
    # that on a loaded machine; a worker that goes on training publishes its next checkpoint seconds later.
    late = [
        step for step, path in layout.complete_checkpoints(run_dir)
        if (path / layout.MARKER).stat().st_mtime > killed_at + 0.5
    ]  # fmt: skip
    assert not late, f"checkpoints {late} published after the driver died (published before: {published_before})"
