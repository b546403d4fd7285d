"""Paths the driver hands to Ray workers: workers run in their own directories, so relative paths must not reach them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cluster.jobs.trainer import resolve_storage
from cluster.root_config import load_config
from cluster.runtime.config import ClusterConfig
from cluster.runtime.ray_setup import relative_path_problem

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_relative_paths_resolve_against_the_driver_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = resolve_storage(
        load_config(REPO_ROOT / "configs" / "tiny.yaml", ["model.init_from=weights/model.safetensors"])
    )
    assert config.cluster.storage_path == str(tmp_path / "runs")
    assert config.data.shards_dir == str(tmp_path / "data" / "shards" / "tiny")
    assert config.model.init_from == str(tmp_path / "weights" / "model.safetensors")
    assert config.model.weights_file is None


def test_joining_a_cluster_refuses_relative_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    local = ClusterConfig()
    assert relative_path_problem(local, {"cluster.storage_path": "./runs"}) is None
    joined = ClusterConfig(address="127.0.0.1:6379")
    problem = relative_path_problem(joined, {"cluster.storage_path": "./runs", "data.shards_dir": "/abs/shards"})
    assert problem is not None and "cluster.storage_path=./runs" in problem and "shards_dir" not in problem
    assert relative_path_problem(joined, {"cluster.storage_path": "/shared/runs"}) is None


def test_a_private_ray_starts_beside_the_stale_address_of_a_killed_head() -> None:
    """A `ray start` head killed without `ray stop` leaves ray_current_cluster behind; ray.init without an address
    would join what it names (and fail: this Ray sets num_cpus). The private local Ray starts regardless."""
    import shutil
    import subprocess
    import sys
    import tempfile

    temp_root = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))  # short: Ray's socket paths live under it
    try:
        (temp_root / "ray").mkdir()
        (temp_root / "ray" / "ray_current_cluster").write_text("127.0.0.1:1")  # Ray's file under RAY_TMPDIR
        script = (
            "from cluster.runtime.config import ClusterConfig\n"
            "from cluster.runtime.ray_setup import connect, shutdown\n"
            "print(connect(ClusterConfig(num_workers=1)))\n"
            "shutdown()\n"
        )
        env = {
            **{name: value for name, value in os.environ.items() if name != "RAY_ADDRESS"},
            "RAY_TMPDIR": str(temp_root),
            "PYTHONPATH": str(REPO_ROOT),
        }
        done = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=180, start_new_session=True
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert "started a local Ray on 127.0.0.1" in done.stdout
    finally:
        shutil.rmtree(temp_root, ignore_errors=True)
