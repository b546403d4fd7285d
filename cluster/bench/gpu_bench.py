"""`launch/bench.py gpu`: every figure one GPU can give in one prepared run, written to one JSON file.

1. Per backbone (`configs/vitb.yaml`, `vitl.yaml`, `vith.yaml`: ViT-B-16, ViT-L-14, ViT-H-14 at their real
   dimensions, random init, each config's micro-batch, bf16): `training.perf.backbone_sweep`.
2. Real training: a synthetic benchmark and its shards, then `train_steps` steps of the ViT-B config through
   Ray + DeepSpeed with one GPU worker; triplets/s and step time from the run's metrics.
3. The eval encoder's rate (images/s) on the trained checkpoint over the synthetic val gallery.

Each part records its own error and the run goes on, so one failure loses nothing else. Without a GPU it is a dry
run at tiny sizes (ContextTiny, a few steps): CI checks that the script runs end to end.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shutil
import statistics
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from cluster.root_config import RootConfig, load_config

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIGS = REPO_ROOT / "configs"
GPU_BACKBONES = ("vitb", "vitl", "vith")


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _section(report: dict[str, Any], name: str, work) -> Any:
    """Run one part; its figures, or its error (the run goes on), land in the report under `name`."""
    started = time.perf_counter()
    try:
        report[name] = work()
    except Exception as error:  # a failed part must not cost the others' figures
        logger.exception("bench part %s failed", name)
        report.setdefault("errors", {})[name] = "".join(traceback.format_exception_only(error)).strip()
        report["errors"][f"{name}_traceback"] = traceback.format_exc()[-4000:]
    report.setdefault("part_seconds", {})[name] = round(time.perf_counter() - started, 1)
    return report.get(name)


def _backbone_config(name: str, dry_run: bool) -> RootConfig:
    if dry_run:
        return load_config(CONFIGS / "tiny.yaml", ["train.micro_batch=4", "train.global_batch=8"])
    return load_config(CONFIGS / f"{name}.yaml", ["model.pretrained=null", "cluster.num_workers=1"])


def _prepare_data(workdir: Path, config_name: str, dry_run: bool) -> list[str]:
    """The synthetic benchmark and its shards for the training part; returns the config overrides using them."""
    from shards.builder.shard_set import build_shards
    from shards.synthetic import generate

    synthetic = workdir / "synthetic"
    if not (synthetic / "objects.json").is_file():
        generate(synthetic, seed=0, n_train=64 if dry_run else 4000, n_val=16 if dry_run else 500, n_test=0)
    overrides = [
        "model.pretrained=null",
        f"data.sources=[{{name: synthetic, kind: cirr, path: {synthetic}, split: train, trees: {synthetic}/trees.jsonl}}]",
        f"data.shards_dir={workdir / ('shards_' + config_name)}",
        "data.noun_phrases.parser=trees",
        "data.samples_per_shard=250",
        f"eval.datasets.synthetic.root={synthetic}",
        "eval.benchmarks=[synthetic]",
        "eval.select_metric=synthetic/recall@1",
    ]
    config = load_config(CONFIGS / f"{config_name}.yaml", overrides)
    build_shards(config.data, config.model.backbone, progress=False)
    return overrides


def _train(workdir: Path, steps: int, dry_run: bool) -> dict[str, Any]:
    from cluster.runtime.ray_setup import connect, shutdown
    from training.monitor.run_monitor import read_metrics

    name = "tiny" if dry_run else "vitb"
    overrides = _prepare_data(workdir, name, dry_run)
    micro = 4 if dry_run else None
    overrides += [
        "cluster.num_workers=1",
        f"cluster.use_gpu={not dry_run}",
        f"cluster.storage_path={workdir / 'runs'}",
        f"cluster.run_name=bench_{name}",
        "cluster.max_failures=0",
        "checkpoint.resume=false",
        f"train.steps={steps}",
        f"checkpoint.every_steps={steps}",
        "logging.every=10",
        f"logging.image_every={steps}",
        "optim.warmup_steps=10",
    ]
    if micro:
        overrides += [f"train.micro_batch={micro}", f"train.global_batch={micro}"]
    config = load_config(CONFIGS / f"{name}.yaml", overrides)
    if not micro:  # one GPU: the global batch is one micro-batch
        config = load_config(CONFIGS / f"{name}.yaml", [*overrides, f"train.global_batch={config.train.micro_batch}"])
    shutil.rmtree(config.run_dir, ignore_errors=True)  # the bench's own scratch run: always from step 0
    connect(config.cluster)  # before anything imports ray: it reads its authentication settings at import
    from cluster.jobs.trainer import run_training

    try:
        run_dir = run_training(config)
    finally:
        shutdown()
    records = read_metrics(run_dir)
    steady = [records[step]["step_time_s"] for step in sorted(records) if step > min(10, steps // 2)]
    step_s = statistics.median(steady) if steady else None
    return {
        "config": name,
        "backbone": config.model.backbone,
        "steps": len(records),
        "global_batch": config.train.global_batch,
        "median_step_s": step_s,
        "triplets_per_s": config.train.global_batch / step_s if step_s else None,
        "final_loss": records[max(records)]["loss"] if records else None,
        "run_dir": str(run_dir),
    }


def _eval_rate(run_dir: Path, device: torch.device) -> dict[str, Any]:
    from shards.model_inputs import eval_transform
    from training.checkpoint import layout
    from training.config_loader import load_section
    from training.evaluation.benchmarks import BENCHMARKS
    from training.evaluation.config import EvalConfig
    from training.evaluation.encode import encode_gallery
    from training.evaluation.methods import METHODS
    from training.evaluation.runner import load_checkpoint_model

    step, checkpoint = layout.latest_complete(run_dir)
    eval_config = load_section(checkpoint / layout.CONFIG, "eval", EvalConfig)
    (split,) = BENCHMARKS.get("synthetic").scored_splits(eval_config.dataset("synthetic"), ["val"])
    model, model_config = load_checkpoint_model(checkpoint, device)
    paths = [split.image_paths[name] for name in split.gallery]
    methods = {"model": METHODS.get("context")}
    workers = eval_config.workers_for(device)
    transform = eval_transform(model_config.backbone)
    encode_gallery(model, methods, paths[: eval_config.batch_size], transform, device, eval_config.batch_size, workers)
    started = time.perf_counter()
    encode_gallery(model, methods, paths, transform, device, eval_config.batch_size, workers)
    seconds = time.perf_counter() - started
    return {"checkpoint_step": step, "images": len(paths), "seconds": seconds, "images_per_s": len(paths) / seconds}


def run(config: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Every part in turn; writes the JSON to `--out` and returns the report (see the module docstring)."""
    device = _device()
    dry_run = device.type != "cuda"
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    out = Path(args.out).resolve()
    started = time.perf_counter()
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if not dry_run else "cpu",
        "dry_run": dry_run,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "host": platform.node(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "backbones": {},
    }
    names = ["tiny"] if dry_run else list(GPU_BACKBONES)
    for name in names:

        def measure(name: str = name) -> dict[str, Any]:
            from training.perf.backbone_sweep import measure_backbone

            backbone_config = _backbone_config(name, dry_run)
            return measure_backbone(
                backbone_config, device, nps=10, repeats=1 if dry_run else args.repeats, check_batch=2 if dry_run else 4
            )

        figures = _section(report, f"backbone_{name}", measure)
        if figures is not None:
            report["backbones"][name] = report.pop(f"backbone_{name}")
    steps = 3 if dry_run else args.train_steps
    trained = _section(report, "train", lambda: _train(workdir, steps, dry_run))
    if trained is not None:
        _section(report, "eval", lambda: _eval_rate(Path(trained["run_dir"]), device))
    report["seconds"] = round(time.perf_counter() - started, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    return {
        "report": str(out),
        "device": report["device"],
        "dry_run": dry_run,
        "errors": sorted(report.get("errors", {})),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/bench_gpu.json", help="where the JSON report goes")
    parser.add_argument("--workdir", default="runs/bench_gpu", help="synthetic data, shards and the training run")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions of each step variant")
    parser.add_argument("--train-steps", type=int, default=100, help="steps of the Ray + DeepSpeed training part")
