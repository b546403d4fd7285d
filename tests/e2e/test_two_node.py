"""A simulated two-node cluster: a Ray head and a second node as separate `ray start` processes on 127.0.0.1.

Each node has one CPU, its own custom resource (`node_a`, `node_b`), temp dir and process group. Training runs two
workers of one CPU each with `cluster.placement_strategy=STRICT_SPREAD`, so each node holds one rank, and
checkpoints to a directory both nodes see. The test kills every process of the second node once the first
checkpoint is complete:

- brought back, the job (`cluster.max_failures=1`) restarts from the latest complete checkpoint and reproduces
  an uninterrupted run's losses and samples exactly;
- never brought back, the job ends after `cluster.resource_wait_s` with one line naming what is missing.

Every process the test started is stopped by pid or by its own process group, even when a test fails.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dist_harness import is_loopback, listening_hosts
from ray_nodes import RayNode, new_token, ray_env
from run_records import data_digest, starts, trajectory
from shard_fixtures import write_shard_set

from cluster.runtime.resources import RESOURCE_WAIT_EXIT, read_placement
from training.checkpoint import layout
from training.monitor.run_monitor import read_metrics

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
STEPS = 12
EVERY = 4


class TwoNodes:
    """The head (`node_a`) and the current second node (`node_b`); every node ever started, for teardown."""

    def __init__(self) -> None:
        self.token = new_token()
        self.started: list[RayNode] = []
        self.head = self._start(RayNode("node_a", self.token, num_cpus=1))
        self.head.wait_for_nodes({"node_a"})
        self.second = self.start_second()

    def _start(self, node: RayNode) -> RayNode:
        self.started.append(node)  # before anything can fail: teardown must see it
        return node

    def start_second(self) -> RayNode:
        self.second = self._start(RayNode("node_b", self.token, num_cpus=1, head_address=self.head.address))
        self.head.wait_for_nodes({"node_a", "node_b"})
        return self.second

    def node_ids(self) -> dict[str, str]:
        """Custom resource (`node_a`, `node_b`) -> Ray node id, of the alive nodes."""
        return {
            name: node["node_id"]
            for node in self.head.alive_nodes()
            for name in node["resources_total"]
            if name in ("node_a", "node_b")
        }

    def stop(self) -> None:
        for node in reversed(self.started):
            try:
                node.stop()
            finally:
                node.remove()


@pytest.fixture(scope="module")
def nodes():
    cluster = None
    try:
        cluster = TwoNodes()
        yield cluster
    finally:
        if cluster is not None:
            cluster.stop()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("two_node")
    write_shard_set(root / "shards", [24] * 6)
    return root


def submit_command(nodes: TwoNodes, workspace: Path, run_name: str, *overrides: str) -> list[str]:
    settings = [
        "data.loader_workers=0",
        f"data.shards_dir={workspace / 'shards'}",
        "data.shuffle_buffer=32",
        "model.fusion_layers=1",
        "train.micro_batch=4",
        "train.global_batch=8",
        f"train.steps={STEPS}",
        "optim.warmup_steps=3",
        f"checkpoint.every_steps={EVERY}",
        "checkpoint.keep=3",
        "logging.every=1",
        "logging.image_every=100",
        "cluster.num_workers=2",
        "cluster.cpus_per_worker=1",  # each node has one CPU: neither can hold both ranks
        "cluster.placement_strategy=STRICT_SPREAD",
        f"cluster.storage_path={workspace / 'runs'}",  # one directory both nodes see
        f"cluster.run_name={run_name}",
        *overrides,
    ]
    runtime_env = {"env_vars": {"GLOO_SOCKET_IFNAME": "lo"}}
    return [
        str(Path(sys.executable).with_name("ray")), "job", "submit", "--address", nodes.head.dashboard,
        "--working-dir", str(REPO_ROOT), "--runtime-env-json", json.dumps(runtime_env), "--",
        sys.executable, "launch/train.py", "--config", "configs/tiny.yaml", *settings,
    ]  # fmt: skip


def start_job(nodes: TwoNodes, workspace: Path, run_name: str, *overrides: str):
    log = open(workspace / f"{run_name}.log", "w")
    command = submit_command(nodes, workspace, run_name, *overrides)
    job = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=ray_env(nodes.token), start_new_session=True
    )
    return job, log


def finish_job(job: subprocess.Popen, log, timeout: float) -> tuple[int | None, str]:
    """Wait for the job's client (None on timeout), then stop it if it still runs; returns (code, output)."""
    try:
        code = job.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        stop_job(job, log)
    return code, Path(log.name).read_text()


def stop_job(job: subprocess.Popen, log) -> None:
    """Kill the job's client by pid if it still runs (a failed test must not wait for the job)."""
    if job.poll() is None:
        job.kill()
        job.wait()
    log.close()


def kill_second_after_first_checkpoint(nodes: TwoNodes, job: subprocess.Popen, run_dir: Path) -> int:
    """SIGKILL every process of the second node once a step after the first checkpoint is logged.

    Returns the latest complete checkpoint's step at the kill (nothing publishes one after it: rank 1 is gone).
    """
    deadline = time.monotonic() + 300
    while not (read_metrics(run_dir).keys() & set(range(EVERY + 1, STEPS + 1))):
        assert job.poll() is None and time.monotonic() < deadline, "the job ended before the first checkpoint"
        nodes.second.track()
        time.sleep(0.02)
    nodes.second.kill()
    assert not nodes.second.running(), f"left running: {nodes.second.running()}"
    return layout.latest_complete(run_dir)[0]


@pytest.fixture(scope="module")
def reference_run(nodes, workspace):
    job, log = start_job(nodes, workspace, "reference")
    code, output = finish_job(job, log, timeout=480)
    assert code == 0, output[-4000:]
    return workspace / "runs" / "reference"


def test_one_rank_runs_on_each_node(nodes, reference_run):
    placement = read_placement(reference_run)
    ids = nodes.node_ids()
    assert sorted(record["rank"] for record in placement) == [0, 1]
    assert {record["node_id"] for record in placement} == {ids["node_a"], ids["node_b"]}
    assert [step for step, _ in layout.complete_checkpoints(reference_run)] == [4, 8, 12]
    nodes.second.track()
    exposed = [host for pid in nodes.second.running() for host in listening_hosts(pid) if not is_loopback(host)]
    assert not exposed, f"the second node listens beyond loopback on {exposed}"


def test_lost_node_back_resumes_from_latest_complete_checkpoint(nodes, workspace, reference_run):
    run_dir = workspace / "runs" / "node_back"
    job, log = start_job(nodes, workspace, "node_back", "cluster.max_failures=1", "cluster.resource_wait_s=300")
    try:
        lost = nodes.node_ids()["node_b"]
        resumable = kill_second_after_first_checkpoint(nodes, job, run_dir)
        nodes.start_second()
        code, output = finish_job(job, log, timeout=480)
    finally:
        stop_job(job, log)
    assert code == 0, output[-4000:]
    assert resumable in (EVERY, 2 * EVERY)  # after the first checkpoint, before the last
    assert starts(run_dir) == [0, resumable]  # one restart, from the latest complete checkpoint
    assert layout.latest_complete(run_dir)[0] == STEPS
    assert trajectory(run_dir) == trajectory(reference_run)  # same losses, lrs and samples, step for step
    assert data_digest(run_dir) == data_digest(reference_run)
    second_attempt = read_placement(run_dir)[2:]
    assert {record["node_id"] for record in second_attempt} == set(nodes.node_ids().values())
    assert lost not in {record["node_id"] for record in second_attempt}


def test_lost_node_gone_for_good_ends_the_job_after_the_wait(nodes, workspace, reference_run):
    run_dir = workspace / "runs" / "node_gone"
    job, log = start_job(nodes, workspace, "node_gone", "cluster.max_failures=1", "cluster.resource_wait_s=20")
    try:
        kill_second_after_first_checkpoint(nodes, job, run_dir)
        killed = time.monotonic()
        code, output = finish_job(job, log, timeout=300)
    finally:
        stop_job(job, log)
    waited = time.monotonic() - killed
    assert code != 0 and f"exit code {RESOURCE_WAIT_EXIT}" in output, output[-4000:]
    # One line (`ray job submit` repeats the job's last output when it fails, so it may appear twice).
    errors = sorted({line for line in output.splitlines() if line.startswith("cluster error:")})
    assert len(errors) == 1, output[-4000:]
    assert "waited 20 s for 2 worker(s) x {'CPU': 1.0} placed STRICT_SPREAD" in errors[0]
    assert "missing: 1 more node(s), each with {'CPU': 1.0}" in errors[0]
    assert waited < 240  # bounded: node death noticed, 20 s wait, no retry
    assert layout.latest_complete(run_dir)[0] < STEPS
