"""End to end: a local Ray head on 127.0.0.1, `ray job submit -- python launch/train.py` with 2 CPU workers.

One head serves the module. A clean 6-step run is the reference; a run stopped at its step-2 checkpoint and
resubmitted, and a run whose rank-0 worker this test SIGKILLs from outside once step 3 is logged (Ray restarts the
worker group from the latest complete checkpoint), must both reproduce its per-step losses and sample digests
exactly. Nothing in the product knows about the fault: the test finds the worker's pid in `metrics.jsonl`.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from dist_harness import free_port, is_loopback, listening_hosts
from run_records import data_digest, start_events, starts, trajectory
from shard_fixtures import write_shard_set

from training.checkpoint import layout
from training.monitor.run_monitor import read_metrics

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))
STEPS = 6
TB_SCALARS = {
    "train/loss",
    "train/contrastive_loss",
    "train/cc_loss",
    "train/lr",
    "train/grad_norm",
    "train/skipped_steps",
    "perf/triplets_per_s",
    "perf/step_time_s",
    "perf/data_wait_frac",
}


TOKEN = secrets.token_hex(32)


def _ray_env() -> dict[str, str]:
    """Token authentication with this module's own token (never ~/.ray/auth_token), loopback only."""
    return os.environ | {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": TOKEN,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "GLOO_SOCKET_IFNAME": "lo",
    }


@pytest.fixture(scope="module")
def ray_head():
    """A private Ray head on loopback, stopped by its own pid (and process group) even when a test fails."""
    dashboard = free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray_e2e_", dir="/tmp")  # short: Ray's socket paths have a length limit
    command = [
        RAY, "start", "--head", "--block", "--disable-usage-stats",
        "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
        f"--port={free_port()}", f"--dashboard-port={dashboard}", f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}", "--num-cpus=3", f"--temp-dir={temp_dir}",
    ]  # fmt: skip
    log = open(Path(temp_dir) / "head.log", "w")
    head = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=_ray_env(), start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                request = urllib.request.Request(f"{address}/api/version", headers={"Authorization": f"Bearer {TOKEN}"})
                urllib.request.urlopen(request, timeout=5).read()
                break
            except OSError:
                if head.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"Ray head did not come up; see {temp_dir}/head.log") from None
                time.sleep(2)
        yield address
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` tears down every process it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)  # stragglers of this head only: its own process group
        except ProcessLookupError:
            pass
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    write_shard_set(root / "shards", [24] * 6)
    return root


def submit_command(address: str, workspace: Path, run_name: str, *overrides: str) -> list[str]:
    """`ray job submit` of the training entry point with the module's small settings."""
    settings = [
        "data.loader_workers=0",
        f"data.shards_dir={workspace / 'shards'}",
        "data.shuffle_buffer=32",
        "model.fusion_layers=1",
        "train.micro_batch=4",
        "train.global_batch=8",
        f"train.steps={STEPS}",
        "optim.warmup_steps=3",
        "checkpoint.every_steps=2",
        "checkpoint.keep=3",
        "logging.every=1",
        "logging.image_every=3",
        f"cluster.storage_path={workspace / 'runs'}",
        f"cluster.run_name={run_name}",
        *overrides,
    ]
    runtime_env = {"env_vars": {"GLOO_SOCKET_IFNAME": "lo"}}
    return [
        RAY, "job", "submit", "--address", address, "--working-dir", str(REPO_ROOT),
        "--runtime-env-json", json.dumps(runtime_env), "--",
        sys.executable, "launch/train.py", "--config", "configs/tiny.yaml", *settings,
    ]  # fmt: skip


def submit(address: str, workspace: Path, run_name: str, *overrides: str):
    """Run the job to its end; returns (exit code, output)."""
    command = submit_command(address, workspace, run_name, *overrides)
    done = subprocess.run(command, capture_output=True, text=True, timeout=480, cwd=REPO_ROOT, env=_ray_env())
    return done.returncode, done.stdout + done.stderr


@pytest.fixture(scope="module")
def clean_run(ray_head, workspace):
    code, output = submit(ray_head, workspace, "clean")
    assert code == 0, output[-4000:]
    return workspace / "runs" / "clean"


def test_job_trains_publishes_checkpoints_and_tensorboard(clean_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert [step for step, _ in layout.complete_checkpoints(clean_run)] == [2, 4, 6]
    assert layout.latest_complete(clean_run)[0] == STEPS
    final = layout.checkpoint_dir(clean_run, STEPS)
    for piece in (layout.WEIGHTS, layout.CONFIG, layout.TRAINER_STATE, layout.DEEPSPEED):
        assert (final / piece).exists(), piece
    state = json.loads((final / layout.TRAINER_STATE).read_text())
    assert state["train"]["step"] == STEPS and state["train"]["samples_seen"] == STEPS * 8
    assert len(state["train"]["data_digest"]) == 16
    assert len(state["ranks"]) == 2
    assert [step for step, *_ in trajectory(clean_run)] == list(range(1, STEPS + 1))
    assert not any(record["skipped"] for record in read_metrics(clean_run).values())
    events = EventAccumulator(str(clean_run / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert TB_SCALARS <= set(events.Tags()["scalars"])
    assert [event.step for event in events.Scalars("train/loss")] == list(range(1, STEPS + 1))
    images = events.Images("attention/np_maps")
    assert [image.step for image in images] == [3, 6] and images[0].width > 128


def test_resubmitted_run_continues_exactly(ray_head, workspace, clean_run):
    code, output = submit(ray_head, workspace, "resumed", "train.steps=2")
    assert code == 0, output[-4000:]
    run_dir = workspace / "runs" / "resumed"
    assert layout.latest_complete(run_dir)[0] == 2
    code, output = submit(ray_head, workspace, "resumed")
    assert code == 0, output[-4000:]
    assert "resuming from" in output and "step 2" in output
    # The console holds the driver's lines; what each rank printed (DeepSpeed's own warning, written below Python,
    # included) is in the run directory instead.
    assert "Setting accelerator to CPU" not in output and "TrainController" not in output, output[-4000:]
    for rank in (0, 1):
        worker_log = (run_dir / "logs" / f"worker_{rank}.log").read_text()
        assert "Setting accelerator to CPU" in worker_log, worker_log[-2000:]
    assert "resumed from" in (run_dir / "logs" / "worker_0.log").read_text()
    assert starts(run_dir) == [0, 2]
    assert trajectory(run_dir) == trajectory(clean_run)  # same losses, lrs and samples, step for step
    assert data_digest(run_dir) == data_digest(clean_run)  # and every rank read the same samples


def test_worker_killed_mid_run_restarts_from_the_latest_complete_checkpoint(ray_head, workspace, clean_run):
    run_dir = workspace / "runs" / "faulty"
    command = submit_command(ray_head, workspace, "faulty", "cluster.max_failures=1")
    log = open(workspace / "faulty_submit.log", "w")
    job = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=_ray_env())
    try:
        deadline = time.monotonic() + 300
        while not (read_metrics(run_dir).keys() & {3, 4, 5}):  # step 3 logged: the step-2 checkpoint is complete
            assert job.poll() is None and time.monotonic() < deadline, "the job ended before step 3 was logged"
            time.sleep(0.02)
        rank0 = start_events(run_dir)[0]["pid"]
        # Every socket rank 0 listens on (Ray's worker, the rendezvous store, gloo) is on loopback.
        exposed = [host for host in listening_hosts(rank0) if not is_loopback(host)]
        os.kill(rank0, signal.SIGKILL)  # rank 0 of the first attempt
        resumable = layout.latest_complete(run_dir)[0]  # nothing publishes a checkpoint once rank 0 is dead
        assert job.wait(timeout=480) == 0, (workspace / "faulty_submit.log").read_text()[-4000:]
    finally:
        if job.poll() is None:
            job.kill()
        log.close()
    assert not exposed, f"rank 0 listened beyond loopback on {exposed}"
    assert resumable in (2, 4)  # killed after the step-2 checkpoint, before the run's last one
    assert starts(run_dir) == [0, resumable]  # one restart, from the latest complete checkpoint
    assert layout.latest_complete(run_dir)[0] == STEPS
    assert trajectory(run_dir) == trajectory(clean_run)
    assert data_digest(run_dir) == data_digest(clean_run)


@pytest.mark.timeout(600)
def test_a_private_ray_beside_another_ray_prints_no_state_api_traceback(ray_head, workspace):
    """Ray Train's placement-group cleaner finds its cluster through the State API; with a second Ray on the machine
    (the module's head) it used to fail with "Found multiple active Ray instances" and a traceback."""
    command = submit_command(ray_head, workspace, "beside-another-ray", "train.steps=4")
    local = command[command.index("--") + 1 :]  # the entry point alone: no cluster, so a private local Ray
    environment = {name: value for name, value in os.environ.items() if not name.startswith("RAY_A")}
    environment |= {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "GLOO_SOCKET_IFNAME": "lo"}
    done = subprocess.run(local, capture_output=True, text=True, timeout=480, cwd=REPO_ROOT, env=environment)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "started a local Ray" in output
    assert "multiple active Ray instances" not in output and "Traceback" not in output
