"""`launch/bench.py loader`: streaming reader throughput, samples per second and per core, on the configured shards."""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import psutil
from tqdm import tqdm

from shards.stream.reader import build_reader
from training.trainer.job import TrainJob


def loader_benchmark(config: TrainJob, seconds: float) -> dict[str, Any]:
    """Stream rank 0 of a one-rank reader for `seconds` and measure its throughput.

    The clock starts after the first batch, so worker start-up and the first shuffle-buffer fill are reported
    apart (`startup_s`) from the steady rate. Nothing else runs, so the rate is what the loader alone delivers.

    Args:
        config: the job config; reads data.*, model.backbone and train.micro_batch.
        seconds: how long to stream after the first batch.

    Returns:
        samples_per_s, cpu_s (CPU time of every process involved over the timed window: this one and its loader
        workers), samples_per_cpu_s (samples per CPU-second, the per-core rate), workers, batch_size,
        steps_per_epoch, samples, seconds, startup_s, cpu_count and the reader's skip counts under `stats`.
    """
    batch_size = config.train.micro_batch
    others = {child.pid for child in psutil.Process().children(recursive=True)}  # not the reader's
    stream = build_reader(config.data, config.model.backbone, batch_size, rank=0, world_size=1)
    workers = config.data.loader_workers
    started = time.perf_counter()
    batches = iter(stream)
    samples = 0
    try:
        next(batches)
        first_batch = time.perf_counter()
        cpu_at_first = _cpu_seconds(others)
        with tqdm(desc="loader benchmark", unit="sample", leave=False) as progress:
            while (elapsed := time.perf_counter() - first_batch) < seconds:
                batch = next(batches)
                samples += len(batch["keys"])
                progress.update(len(batch["keys"]))
        cpu = {pid: seconds - cpu_at_first.get(pid, 0.0) for pid, seconds in _cpu_seconds(others).items()}
    finally:
        stream.close()
    rate = samples / max(elapsed, 1e-9)
    cpu_s = sum(cpu.values())
    return {
        "samples_per_s": round(rate, 2),
        "cpu_s": round(cpu_s, 3),
        "samples_per_cpu_s": round(samples / max(cpu_s, 1e-9), 2),
        "processes": len(cpu),
        "workers": workers,
        "cpu_count": os.cpu_count(),
        "batch_size": batch_size,
        "steps_per_epoch": stream.steps_per_epoch,
        "samples": samples,
        "seconds": round(elapsed, 3),
        "startup_s": round(first_batch - started, 3),
        "backbone": config.model.backbone,
        "stats": stream.stats,
    }


def _cpu_seconds(others: set[int]) -> dict[int, float]:
    """User + system CPU seconds of this process and its live descendants but `others` (the loader workers)."""
    me = psutil.Process()
    seconds = {}
    for process in [me, *(child for child in me.children(recursive=True) if child.pid not in others)]:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        seconds[process.pid] = times.user + times.system
    return seconds


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=float, default=20.0, help="how long to stream after the first batch")


def run(config: TrainJob, args: argparse.Namespace) -> dict[str, Any]:
    return loader_benchmark(config, seconds=args.seconds)
