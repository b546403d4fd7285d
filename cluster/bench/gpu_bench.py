"""`launch/bench.py gpu`: every figure one GPU can give in one prepared run, written to one JSON file as it comes.

A GPU may be lent for ten minutes, once. So the run
1. starts with a preflight (`cluster.bench.gpu_preflight`) that fails in seconds, with one line and exit code 3,
   when CUDA is not usable, /dev/shm or GPU memory is short, or a local Ray would not see the GPU;
2. measures the most valuable figures first: the step of ViT-H-14, ViT-L-14, ViT-B-16 (`configs/vith.yaml`,
   `vitl.yaml`, `vitb.yaml` at their real dimensions, random init, each config's micro-batch, bf16;
   `training.perf.backbone_sweep`), then real training through Ray + DeepSpeed at ZeRO-1
   (`cluster.bench.gpu_training`), then the eval job's decoding and encoding rates
   (`training.perf.eval_encode`);
3. writes each figure to the JSON report the moment it exists (`cluster.bench.gpu_report`), so a run cut short
   keeps what it measured and marks the rest `not reached`;
4. fits `--budget-s` (`cluster.bench.gpu_budget`): repeats and training steps are planned from the time left,
   and a section that no longer fits is not started. One line per section goes to stderr with its time.

`--dry-run` is the only way to run without a GPU: the same sections and JSON layout on the CPU, each backbone at a
tiny width (its own patch size, 2 layers of width 64) and the training part on ContextTiny. `labels` in the
report says what every figure includes.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cluster.bench.gpu_budget import Budget, SectionCost
from cluster.bench.gpu_preflight import (
    EVAL_PREFETCH,
    TRAIN_PREFETCH,
    LoaderNeeds,
    PreflightFailed,
    image_batch_bytes,
    preflight,
)
from cluster.bench.gpu_report import NOT_REACHED, BenchReport
from cluster.root_config import RootConfig, load_config

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIGS = REPO_ROOT / "configs"
BACKBONES = {"ViT-H-14": "vith", "ViT-L-14": "vitl", "ViT-B-16": "vitb"}
"""Backbone section -> its config, most valuable first."""
TRAINING, EVAL = "ray_deepspeed", "eval"
EVAL_BATCHES = 20
DRY_RUN_STEPS = 3
LABELS = {
    "step_s": "fastest of `repeats` forward + backward passes of one micro-batch through the efficient path "
    "(bf16 autocast on a GPU, fp32 on a CPU), after a warm-up, device synchronised: no optimizer step, no data "
    "loading, no DeepSpeed",
    "triplets_per_s": "micro_batch / step_s: forward + backward only",
    "peak_mem_gb": "torch.cuda.max_memory_allocated over the timed steps: fp32 weights, their gradients and the "
    "activations; no optimizer state (optimizer_state_gb) and no DeepSpeed buffers; null on a CPU",
    "optimizer_state_gb": "12 bytes per parameter, not in peak_mem_gb: AdamW's two fp32 moments (8) and the fp32 "
    "copy of the weights DeepSpeed's ZeRO >= 1 optimizer updates (4), divided by the ranks under ZeRO >= 1 (at "
    "ZeRO-0 every rank holds the 8 bytes of moments)",
    "mfu": "analytic model FLOPs of the step (training.monitor.mfu; the recomputation of activation checkpointing "
    "not counted) / step_s / the device's bf16 peak",
    "checkpointing_on, checkpointing_off": "the step with the image and text towers' activation checkpointing on "
    "and off (the config's own mode is measured first)",
    "variants": "training.perf.step on the same batch: efficient vs released-code Text-CC (cc_ratio) and fused vs "
    "eager fusion attention (attn_ratio); forward + backward only, fastest of `repeats`, variants alternating",
    "fused_vs_eager_bf16": "both paths under bf16 autocast: it includes the eager reference's own bf16 rounding of "
    "its scores; fused_bf16_vs_eager_fp32 and eager_bf16_vs_eager_fp32 measure each path against fp32",
    "ray_deepspeed.run.median_step_s": "median step_time_s of metrics.jsonl after the first 10 steps: the whole "
    "step through Ray + DeepSpeed on one GPU (data wait, forward, backward, optimizer update, logging)",
    "ray_deepspeed.run.triplets_per_s": "global_batch / median_step_s, data wait included",
    "ray_deepspeed.run.median_data_wait_share": "median of data_wait_s / step_time_s: near 0, the step is not "
    "waiting for the loader",
    "ray_deepspeed.so_far": "the same figures while the run trains, read from metrics.jsonl every few seconds",
    "eval.decode.images_per_s": "the eval transform (decode, resize, crop, normalise) in persistent DataLoader "
    "workers, timed on a second pass over the gallery (first_pass_s includes the workers' start-up)",
    "eval.encode.images_per_s": "already-decoded images as encode_gallery runs them: copy to the device, image "
    "tower and gallery embedding under bf16 autocast, normalise, copy back; >= 20 batches after 2 warm-up "
    "batches; no decoding",
}


def _costs(args: argparse.Namespace) -> dict[str, SectionCost]:
    """Estimated seconds of each section (start-up, one unit), in the order they run.

    GPU: guesses for an H100 until a run measures them (ViT-H: build on the GPU, warm-ups of five step variants,
    the path checks; one repeat is five steps, the released-code Text-CC one about five steps by itself). The
    training part's step is replaced by the measured ViT-B step once that section has run.
    """
    if args.dry_run:  # as measured on the project's 2-core CPU when it was quiet (about 3 times that under load)
        backbone = SectionCost(3.0, 1.0, 1, 1)
        return {
            **{name: copy.copy(backbone) for name in BACKBONES},
            TRAINING: SectionCost(45.0, 2.0, DRY_RUN_STEPS, DRY_RUN_STEPS, "steps"),
            EVAL: SectionCost(5.0, 0.1, EVAL_BATCHES, EVAL_BATCHES, "batches"),
        }
    repeats = max(1, args.repeats)
    return {
        "ViT-H-14": SectionCost(45.0, 6.0, 1, repeats),
        "ViT-L-14": SectionCost(30.0, 3.0, 1, repeats),
        "ViT-B-16": SectionCost(20.0, 1.5, 1, repeats),
        TRAINING: SectionCost(100.0, 0.3, min(30, args.train_steps), max(1, args.train_steps), "steps"),
        EVAL: SectionCost(30.0, 0.5, args.eval_batches, args.eval_batches, "batches"),
    }


def tiny_width(backbone: str, directory: Path) -> str:
    """Register `<backbone>-tiny-width` with open_clip: its patch size at ContextTiny's width (dry runs only)."""
    import open_clip

    from shards.model_inputs import model_config

    config = copy.deepcopy(model_config(backbone))
    patch = config["vision_cfg"]["patch_size"]
    config["vision_cfg"].update(layers=2, width=64, head_width=32, image_size=4 * patch)
    config["text_cfg"].update(width=64, heads=2, layers=2)
    config["embed_dim"] = 64
    name = f"{backbone}-tiny-width"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    path.write_text(json.dumps(config, indent=1))
    open_clip.add_model_config(path)
    return name


def backbone_config(name: str, args: argparse.Namespace, workdir: Path) -> RootConfig:
    """The section's config: the shipped one at its real size, or (dry run) at a tiny width with 4 triplets."""
    overrides = ["model.pretrained=null", "cluster.num_workers=1"]
    if args.dry_run:
        small = tiny_width(name, workdir / "model_configs")
        overrides += [f"model.backbone={small}", "train.micro_batch=4", "train.global_batch=4"]
    return load_config(CONFIGS / f"{BACKBONES[name]}.yaml", overrides)


def default_loader_workers() -> int:
    """Training loader workers for the bench: most of the cores, so the ViT-B step does not wait for data."""
    return min(12, max(1, (os.cpu_count() or 1) - 4))


def loader_needs(args: argparse.Namespace) -> list[LoaderNeeds]:
    """The shared memory the training and eval loaders of this run will hold (they run one after the other)."""
    from shards.model_inputs import image_size

    config = load_config(CONFIGS / ("tiny.yaml" if args.dry_run else "vitb.yaml"), ["model.pretrained=null"])
    size = image_size(config.model.backbone)
    micro = 4 if args.dry_run else config.train.micro_batch
    eval_workers = config.eval.workers_for(torch.device("cpu" if args.dry_run else "cuda"))
    return [
        LoaderNeeds("training", args.loader_workers, TRAIN_PREFETCH, image_batch_bytes(micro, 2, size)),
        LoaderNeeds("eval", eval_workers, EVAL_PREFETCH, image_batch_bytes(config.eval.batch_size, 1, size)),
    ]


def _commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None


def _header(args: argparse.Namespace, checks: dict[str, Any]) -> dict[str, Any]:
    return {
        "bench": "launch/bench.py gpu",
        "dry_run": args.dry_run,
        "device": "cpu (dry run)" if args.dry_run else checks.get("device"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "driver": checks.get("driver"),
        "host": platform.node(),
        "commit": _commit(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "budget_s": args.budget_s,
        "preflight": checks,
        "labels": LABELS,
    }


def _sections(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    width = "tiny width (2 layers of width 64, own patch size)" if args.dry_run else "real size, random init"
    sections = {
        name: {"config": f"configs/{config}.yaml", "measures": f"the training step of {name} at {width}"}
        for name, config in BACKBONES.items()
    }
    trained = "configs/tiny.yaml" if args.dry_run else "configs/vitb.yaml"
    sections[TRAINING] = {"config": trained, "measures": "real training through Ray + DeepSpeed at ZeRO-1"}
    sections[EVAL] = {"config": trained, "measures": "the eval job's gallery decoding and encoding rates"}
    return sections


class _Run:
    """One bench run: the report, the budget and the sections in order."""

    def __init__(self, args: argparse.Namespace, report: BenchReport, say: Callable[[str], None]) -> None:
        self.args = args
        self.report = report
        self.say = say
        self.budget = Budget(args.budget_s, _costs(args))
        self.device = torch.device("cpu" if args.dry_run else "cuda")
        self.workdir = Path(args.workdir).resolve()
        if args.dry_run:
            # On a CPU shared with other work, OpenMP threads waiting on each other make a tiny step up to 100x
            # slower; one thread per process (here and, through the environment, in the Ray workers) avoids it.
            torch.set_num_threads(1)
            os.environ.setdefault("OMP_NUM_THREADS", "1")

    def section(self, name: str, work: Callable[[int], None]) -> None:
        """Plan `name`, run `work(units)` inside the report's section, print its line."""
        plan = self.budget.plan(name)
        cost = self.budget.costs[name]
        if plan is None:
            self.report.skip(name, self.budget.refusal(name))
            self.say(f"{name}: {NOT_REACHED} ({self.budget.refusal(name)})")
            return
        with self.report.running(name, planned_s=round(plan.planned_s), **{cost.unit: plan.units}) as entry:
            work(plan.units)
        self.say(
            f"{name}: {entry['status']} in {entry['seconds']:.1f} s (planned {plan.planned_s:.0f} s, {cost.unit}: "
            f"{plan.units}); {max(self.budget.left(), 0):.0f} s of the budget left"
            + (f": {entry['error'].splitlines()[-1]}" if "error" in entry else "")
        )

    def backbone(self, name: str, repeats: int) -> None:
        from training.perf.backbone_sweep import measure_backbone

        config = backbone_config(name, self.args, self.workdir)
        record = self.report.recorder(name)
        record("backbone", config.model.backbone)
        record("config_grad_checkpointing", config.model.grad_checkpointing)
        try:
            check_batch = 2 if self.args.dry_run else 4
            measure_backbone(config, self.device, record, nps=10, repeats=repeats, check_batch=check_batch)
        finally:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()  # the training part's worker is another process: leave it the memory

    def use_measured_step(self) -> None:
        """The training part's step cost from the ViT-B step just measured (+50%: optimizer, DeepSpeed, logging)."""
        figures = self.report.section("ViT-B-16")["figures"]
        step = (figures.get("checkpointing_off") or {}).get("step_s")
        if step and not self.args.dry_run:
            self.budget.update(TRAINING, unit_s=1.5 * step + 0.02)

    def run(self) -> None:
        from cluster.bench.gpu_training import DataBuild, measure_training

        # Two cores stay with this process: it launches the GPU sections' kernels while the data is built.
        workers = max(1, (os.cpu_count() or 1) - 2) if not self.args.dry_run else 1
        data = DataBuild(self.workdir, "tiny" if self.args.dry_run else "vitb", self.args.dry_run, workers)
        run_dir: list[Path] = []
        try:
            for name in BACKBONES:
                self.section(name, lambda repeats, name=name: self.backbone(name, repeats))
            self.use_measured_step()

            def train(steps: int) -> None:
                record = self.report.recorder(TRAINING)
                run_dir.append(
                    measure_training(self.workdir, data, steps, self.args.dry_run, self.args.loader_workers, record)
                )

            self.section(TRAINING, train)
            if run_dir:
                from training.perf.eval_encode import measure_eval_encode

                self.section(
                    EVAL,
                    lambda batches: measure_eval_encode(run_dir[0], self.device, self.report.recorder(EVAL), batches),
                )
            else:
                self.report.skip(EVAL, "needs the checkpoint of the training part, which did not finish")
                self.say(f"{EVAL}: {NOT_REACHED} (no checkpoint from the training part)")
        finally:
            data.stop()


def _stop_on_sigterm() -> None:
    """A `timeout` sends SIGTERM: leave through SystemExit, so the report and Ray are closed on the way out."""
    if hasattr(signal, "SIGTERM"):
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))


def run(config: Any, args: argparse.Namespace, say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Preflight, then every section in turn (see the module docstring); returns where the report is and its state.

    Raises:
        PreflightFailed: a check failed (one line); nothing else has started.
    """
    say = say or (lambda line: sys.stderr.write(line + "\n"))
    if args.loader_workers is None:
        args.loader_workers = 1 if args.dry_run else default_loader_workers()
    out = Path(args.out).resolve()
    try:
        checks = preflight(lambda: loader_needs(args), args.dry_run, args.min_free_gpu_gb)
    except PreflightFailed as failure:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"bench": "launch/bench.py gpu", "preflight": {"failed": str(failure)}}) + "\n")
        raise
    say(f"preflight: ok in {checks['seconds']:.1f} s ({'dry run on the CPU' if args.dry_run else checks['device']})")
    report = BenchReport(out, _header(args, checks), _sections(args))
    _stop_on_sigterm()
    _Run(args, report, say).run()
    report.finish()
    sections = report.document["sections"]
    return {
        "report": str(out),
        "device": report.document["device"],
        "dry_run": args.dry_run,
        "failed": report.failed_sections(),
        "not_reached": [name for name, entry in sections.items() if entry["status"] == NOT_REACHED],
        "seconds": report.document["seconds"],
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/bench_gpu.json", help="the JSON report, rewritten as figures come")
    parser.add_argument("--workdir", default="runs/bench_gpu", help="synthetic data, shards and the training run")
    parser.add_argument("--dry-run", action="store_true", help="the tiny CPU dry run (never chosen by itself)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="seconds for all sections (default 420)")
    parser.add_argument("--repeats", type=int, default=3, help="most timed repetitions of each step variant")
    parser.add_argument("--train-steps", type=int, default=100, help="most steps of the Ray + DeepSpeed part")
    parser.add_argument("--eval-batches", type=int, default=EVAL_BATCHES, help="timed batches of the eval encode")
    parser.add_argument(
        "--loader-workers", type=int, default=None, help="training loader workers (default: cores - 4, at most 12)"
    )
    parser.add_argument(
        "--min-free-gpu-gb", type=float, default=40.0, help="free GPU memory the preflight requires (GiB)"
    )
