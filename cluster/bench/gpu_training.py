"""The Ray + DeepSpeed part of `launch/bench.py gpu`: real training steps on a synthetic benchmark's shards.

The data (a synthetic benchmark and its shards) is built in a child process started with the bench, so that it is
ready when the GPU sections before this one are done. The run itself is the product's: `run_training` with one GPU
worker, ZeRO-1 (what ViT-L and ViT-H train with), `cluster.resource_wait_s=60`, and enough loader workers that the
step is not waiting for data; `data_wait_s` in its `metrics.jsonl` says whether it was. While it trains, the
figures so far are read from `metrics.jsonl` into the report every few seconds, so a run cut short keeps them.
"""

from __future__ import annotations

import shutil
import statistics
import threading
import time
from collections.abc import Callable
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from cluster.root_config import RootConfig, load_config

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIGS = REPO_ROOT / "configs"
RESOURCE_WAIT_S = 60
"""The training part's wait for its GPU worker: a Ray that does not see the GPU must not eat the window."""
WARMUP_STEPS = 10
"""Steps left out of the medians: the first ones include kernel selection and the loaders' start."""
FOLLOW_EVERY_S = 5.0

Record = Callable[[str, Any], None]


def data_overrides(workdir: Path, config_name: str, workers: int) -> list[str]:
    """The config overrides that train on the bench's synthetic benchmark and its shards."""
    synthetic = workdir / "synthetic"
    return [
        "model.pretrained=null",
        f"data.sources=[{{name: synthetic, kind: cirr, path: {synthetic}, split: train, trees: {synthetic}/trees.jsonl}}]",
        f"data.shards_dir={workdir / ('shards_' + config_name)}",
        "data.noun_phrases.parser=trees",
        "data.samples_per_shard=250",
        f"data.build_workers={workers}",
        f"eval.datasets.synthetic.root={synthetic}",
        "eval.benchmarks=[synthetic]",
        "eval.select_metric=synthetic/recall@1",
    ]


def build_data(workdir: Path, config_name: str, dry_run: bool, workers: int) -> None:
    """Write the synthetic benchmark (train and val) and the training shards (kept when already there)."""
    from shards.builder.shard_set import build_shards
    from shards.synthetic import generate

    synthetic = workdir / "synthetic"
    if not (synthetic / "objects.json").is_file():
        counts = (64, 16) if dry_run else (4000, 500)
        generate(synthetic, seed=0, n_train=counts[0], n_val=counts[1], n_test=0, workers=max(1, workers))
    config = load_config(CONFIGS / f"{config_name}.yaml", data_overrides(workdir, config_name, workers))
    build_shards(config.data, config.model.backbone, progress=False)


class DataBuild:
    """`build_data` in a child process, started at once so that the data is ready when the training part starts.

    Spawned, not forked: the parent may hold a CUDA context. Not a daemon either: the shard builder starts
    processes of its own. `stop` ends it when the bench ends first (a budget that leaves out the training part).
    """

    def __init__(self, workdir: Path, config_name: str, dry_run: bool, workers: int) -> None:
        self.overrides = data_overrides(workdir, config_name, workers)
        self.process = get_context("spawn").Process(
            target=build_data, args=(workdir, config_name, dry_run, workers), name="bench-data"
        )
        self.process.start()

    def result(self) -> list[str]:
        """Wait for the build; the overrides that use its data.

        Raises:
            RuntimeError: the build failed (its traceback is on stderr).
        """
        self.process.join()
        if self.process.exitcode != 0:
            raise RuntimeError(f"building the synthetic data failed (exit {self.process.exitcode}; see stderr)")
        return self.overrides

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(10)


def summarise(records: dict[int, dict[str, Any]], global_batch: int) -> dict[str, Any]:
    """Medians over the steps after the warm-up (all steps when there are few)."""
    steps = sorted(records)
    steady = [step for step in steps if step > min(WARMUP_STEPS, len(steps) // 2)] or steps
    times = [records[step]["step_time_s"] for step in steady]
    waits = [records[step].get("data_wait_s") for step in steady]
    shares = [wait / seconds for wait, seconds in zip(waits, times) if wait is not None and seconds > 0]
    step_s = statistics.median(times) if times else None
    return {
        "steps": len(steps),
        "steady_steps": len(steady),
        "median_step_s": step_s,
        "triplets_per_s": global_batch / step_s if step_s else None,
        "median_data_wait_share": statistics.median(shares) if shares else None,
        "max_data_wait_share": max(shares) if shares else None,
        "final_loss": records[steps[-1]].get("loss") if steps else None,
    }


def _follow(run_dir: Path, global_batch: int, record: Record, stop: threading.Event) -> None:
    """Copy the figures so far into the report until `stop` (the run's metrics.jsonl, read every few seconds)."""
    from training.monitor.run_monitor import read_metrics

    while not stop.wait(FOLLOW_EVERY_S):
        records = read_metrics(run_dir)
        if records:
            record("so_far", summarise(records, global_batch))


def training_config(
    workdir: Path, overrides: list[str], steps: int, dry_run: bool, loader_workers: int
) -> tuple[str, RootConfig]:
    """(config name, the bench's training config): one GPU worker at ZeRO-1, one micro-batch per step."""
    name = "tiny" if dry_run else "vitb"
    overrides = [
        *overrides,
        "cluster.num_workers=1",
        f"cluster.use_gpu={not dry_run}",
        f"cluster.storage_path={workdir / 'runs'}",
        f"cluster.run_name=bench_{name}",
        "cluster.max_failures=0",
        f"cluster.resource_wait_s={RESOURCE_WAIT_S}",
        "deepspeed.zero_stage=1",
        f"data.loader_workers={loader_workers}",
        "checkpoint.resume=false",
        f"train.steps={steps}",
        f"checkpoint.every_steps={steps}",
        "logging.every=10",
        f"logging.image_every={steps}",
        "optim.warmup_steps=10",
    ]
    if dry_run:
        overrides += ["train.micro_batch=4", "train.global_batch=4"]
    config = load_config(CONFIGS / f"{name}.yaml", overrides)
    if not dry_run:  # one GPU: the global batch is one micro-batch
        config = load_config(CONFIGS / f"{name}.yaml", [*overrides, f"train.global_batch={config.train.micro_batch}"])
    return name, config


def measure_training(
    workdir: Path, data: DataBuild, steps: int, dry_run: bool, loader_workers: int, record: Record
) -> Path:
    """Train `steps` steps through Ray + DeepSpeed and record the run's figures; returns the run directory."""
    from cluster.runtime.ray_setup import connect, shutdown
    from training.monitor.run_monitor import read_metrics

    started = time.perf_counter()
    overrides = data.result()
    record("data_ready_wait_s", time.perf_counter() - started)  # built beside the GPU sections: ~0 is the aim
    name, config = training_config(workdir, overrides, steps, dry_run, loader_workers)
    setup = {
        "config": f"configs/{name}.yaml",
        "backbone": config.model.backbone,
        "zero_stage": config.deepspeed.zero_stage,
        "global_batch": config.train.global_batch,
        "loader_workers": config.data.loader_workers,
        "planned_steps": steps,
        "resource_wait_s": config.cluster.resource_wait_s,
    }
    record("setup", setup)
    shutil.rmtree(config.run_dir, ignore_errors=True)  # the bench's own scratch run: always from step 0
    connect(config.cluster)  # before anything imports ray: it reads its authentication settings at import
    from cluster.jobs.trainer import run_training

    stop = threading.Event()
    follower = threading.Thread(
        target=_follow, args=(config.run_dir, config.train.global_batch, record, stop), daemon=True
    )
    follower.start()
    try:
        run_dir = run_training(config)
    finally:
        stop.set()
        follower.join()
        shutdown()
    record("run", summarise(read_metrics(run_dir), config.train.global_batch))
    record("run_dir", str(run_dir))
    return run_dir
