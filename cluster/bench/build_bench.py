"""The shard-build benchmark: one synthetic set built in process, then on Ray with 1 and 2 workers, then on a
simulated two-node cluster with one node and with two; wall time, triplets/s, CPU, a per-stage profile and the
driver's peak RSS of each build, written to the JSON report as each build ends.

    python launch/bench.py build [--triplets 200000] [--out runs/bench_build.json] [--builds in_process,ray,two_node]

Each build is `launch/build_shards.py` in its own process, into an empty directory (so every build parses every
caption and writes every shard), with `--report` for its figures. Ray workers run one per CPU with one thread each
(Ray sets `OMP_NUM_THREADS=1` for a one-CPU task). The two-node cluster is the reliability tests' one: two
`ray start` nodes of one CPU each on 127.0.0.1 (tests/support/ray_nodes.py), with token auth.

CPU seconds are the machine's (user, nice, system and interrupts over all cores, psutil) while the build ran: on a
quiet machine that is the build's own cost, Ray's daemons included.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "launch" / "build_shards.py"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--triplets", type=int, default=200_000, help="synthetic train triplets (default 200000)")
    parser.add_argument("--workdir", default="runs/bench_build", help="the synthetic set and the builds")
    parser.add_argument("--out", default="runs/bench_build.json", help="the JSON report, rewritten after each build")
    parser.add_argument("--workers", default="1,2", help="Ray worker counts to build with (default 1,2)")
    parser.add_argument(
        "--builds",
        default="in_process,ray,two_node",
        help="which builds, in order (default in_process,ray,two_node): ray builds once per --workers count; "
        "two_node with one node, then two",
    )
    parser.add_argument("--keep", action="store_true", help="keep the built shard sets (default: removed)")


def _machine_cpu_s() -> float:
    # `nice` too: Ray starts its workers niced, and their time is counted there, not under `user`.
    times = psutil.cpu_times()
    return times.user + times.nice + times.system + times.irq + times.softirq


def synthetic_set(root: Path, triplets: int, say: Callable[[str], None]) -> Path:
    """The synthetic train split of `triplets` triplets at `root`, generated unless it is there already."""
    from shards.synthetic import MARKER, generate

    marker = root / MARKER
    if marker.is_file() and json.loads(marker.read_text()).get("triplets", {}).get("train") == triplets:
        return root
    started = time.perf_counter()
    summary = generate(root, 0, triplets, 0, 0, workers=os.cpu_count() or 1, show_progress=True)
    say(f"synthetic set: {summary.triplets['train']} triplets in {time.perf_counter() - started:.0f} s")
    return root


def build(
    name: str,
    root: Path,
    workdir: Path,
    overrides: list[str],
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """One build in its own process into an empty directory; its report with wall time and machine CPU."""
    shards = workdir / name
    shutil.rmtree(shards, ignore_errors=True)
    report_path = workdir / f"{name}.report.json"
    command = [
        sys.executable, str(BUILD_SCRIPT), "--config", "tiny", "--report", str(report_path),
        f"data.sources.0.path={root}", f"data.sources.0.trees={root / 'trees.jsonl'}", f"data.shards_dir={shards}",
        "data.samples_per_shard=1000", *overrides,
    ]  # fmt: skip
    cpu_before, started = _machine_cpu_s(), time.perf_counter()
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - started, _machine_cpu_s() - cpu_before
    if result.returncode != 0:
        raise RuntimeError(f"build {name} failed ({result.returncode}): {result.stderr[-2000:]}")
    report = json.loads(report_path.read_text())
    samples = report["samples"]
    phases = report["phases"]
    serial = phases.get("read", 0.0) + phases.get("plan", 0.0)
    return {
        "samples": samples,
        "wall_s": round(wall, 2),
        "triplets_per_s": round(samples / wall, 1),
        "machine_cpu_s": round(cpu, 1),
        "triplets_per_cpu_s": round(samples / cpu, 1),
        "phases_s": {key: round(value, 2) for key, value in phases.items()},
        "stage_worker_s": {key: round(value, 2) for key, value in report["timings"].items()},
        "serial_driver_s": round(serial, 2),
        "serial_driver_share": round(serial / wall, 4),
        "driver_peak_rss_mb": round(report["driver_peak_rss_bytes"] / 2**20, 1),
        "shards": report["shards"],
        "shards_dir": str(workdir / name),
    }


class _TwoNodes:
    """The reliability tests' simulated cluster: `ray start` nodes of one CPU each on 127.0.0.1."""

    def __init__(self) -> None:
        sys.path.insert(0, str(REPO_ROOT / "tests" / "support"))
        import ray_nodes

        self.ray_nodes = ray_nodes
        self.token = ray_nodes.new_token()
        self.nodes: list = []

    def start(self, name: str) -> None:
        head = self.nodes[0].address if self.nodes else None
        node = self.ray_nodes.RayNode(name, self.token, num_cpus=1, head_address=head)
        self.nodes.append(node)
        self.nodes[0].wait_for_nodes({n.name for n in self.nodes})

    @property
    def env(self) -> dict[str, str]:
        return self.ray_nodes.ray_env(self.token) | {"RAY_ADDRESS": self.nodes[0].address}

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.stop()
            node.remove()


def run(config: Any, args: argparse.Namespace, say: Callable[[str], None] | None = None) -> dict[str, Any]:
    say = say or (lambda line: sys.stderr.write(line + "\n"))
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    out = Path(args.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    root = synthetic_set(workdir / f"synthetic-{args.triplets}", args.triplets, say)
    report: dict[str, Any] = {
        "benchmark": "build",
        "triplets": args.triplets,
        "cpus": os.cpu_count(),
        "builds": {},
        "sha256_equal": None,
    }

    def record(name: str, overrides: list[str], env: dict[str, str] | None = None) -> None:
        figures = build(name, root, workdir, overrides, env)
        report["builds"][name] = figures
        say(
            f"{name}: {figures['wall_s']:.0f} s, {figures['triplets_per_s']:.0f} triplets/s, "
            f"{figures['triplets_per_cpu_s']:.0f} triplets/CPU-s, driver {figures['driver_peak_rss_mb']:.0f} MB"
        )
        out.write_text(json.dumps(report, indent=1, sort_keys=True))

    chosen = args.builds.split(",")
    if unknown := set(chosen) - {"in_process", "ray", "two_node"}:
        raise ValueError(f"--builds: unknown {sorted(unknown)}; known: in_process, ray, two_node")
    counts = [int(count) for count in args.workers.split(",")]
    if "in_process" in chosen:
        record("in_process", ["data.build_workers=0"])
    for workers in counts if "ray" in chosen else []:
        record(f"ray_{workers}", [f"data.build_workers={workers}", "data.build_on=ray"])
    if "two_node" in chosen:
        nodes = _TwoNodes()
        try:
            nodes.start("node_a")
            record("two_node_1", ["data.build_workers=1", "data.build_on=ray"], nodes.env)
            nodes.start("node_b")
            record("two_node_2", ["data.build_workers=2", "data.build_on=ray"], nodes.env)
        finally:
            nodes.stop()
    builds = report["builds"]
    index = {name: (Path(f["shards_dir"]) / "index.json").read_bytes() for name, f in builds.items()}
    report["sha256_equal"] = len(set(index.values())) == 1  # the index lists every shard's sha256
    base = builds.get(f"ray_{counts[0]}")
    for name, figures in builds.items():
        if base and name.startswith("ray_"):
            figures["speedup_vs_ray_1"] = round(figures["triplets_per_s"] / base["triplets_per_s"], 3)
    if "two_node_2" in builds:
        builds["two_node_2"]["speedup_vs_one_node"] = round(
            builds["two_node_2"]["triplets_per_s"] / builds["two_node_1"]["triplets_per_s"], 3
        )
    out.write_text(json.dumps(report, indent=1, sort_keys=True))
    if not args.keep:
        for figures in builds.values():
            shutil.rmtree(figures["shards_dir"], ignore_errors=True)
    return {"report": str(out), "sha256_equal": report["sha256_equal"]}
