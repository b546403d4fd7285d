"""What a person watching a run sees (rank 0): TensorBoard scalars and NP attention-map images, a per-step
`metrics.jsonl`, and a console line every `logging.every` steps.

`<run_dir>/metrics.jsonl` holds one JSON object per step: step, each loss term, lr, grad_norm, skipped, samples,
step_time_s, data_wait_s (the part of the step spent waiting for its batches) and a digest of the sample keys
rank 0 consumed (every rank's keys are combined into `data_digest` in each checkpoint's train state). A restarted
attempt first drops the records of the steps after the checkpoint it resumes from (an earlier attempt logged them,
and it runs them again), then appends a `{"event": "start"}` line (with rank 0's pid): the file never holds two
records of one step.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.monitor.attention_images import attention_grid
from training.monitor.config import LoggingConfig
from training.monitor.mfu import StepShape, peak_bf16_flops, step_flops

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def read_metrics(run_dir: str | Path) -> dict[int, dict[str, Any]]:
    """The logged record of every step of a run, keyed by step (the last one, for files of older versions)."""
    records: dict[int, dict[str, Any]] = {}
    path = Path(run_dir) / METRICS_FILE
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line being written, or torn by a crash
                continue
            if "step" in record:
                records[record["step"]] = record
    return records


def drop_steps_after(path: Path, step: int) -> int:
    """Rewrite a metrics file without its records of steps after `step` (events stay), atomically.

    A line torn by a crash mid-write is dropped too. Returns how many lines were dropped.
    """
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if isinstance(record, dict) and record.get("step", 0) > step:
            dropped += 1
            continue
        kept.append(line)
    if dropped:
        partial = path.with_name(path.name + ".partial")
        partial.write_text("".join(f"{line}\n" for line in kept))
        os.replace(partial, path)
    return dropped


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


class Monitor:
    """Logs every step on rank 0; other ranks only join the collective parts (none, unless ZeRO-3 images)."""

    def __init__(
        self,
        settings: LoggingConfig,
        run_dir: str | Path,
        *,
        total_steps: int,
        global_batch: int,
        backbone: str,
        rank: int,
        start_step: int,
        model: torch.nn.Module,
        device,
        partitioned: bool = False,
        text_cc: bool = True,
        console: bool = True,
    ) -> None:
        """
        Args:
            settings: the `logging` section.
            run_dir: where `tensorboard/` and `metrics.jsonl` go (rank 0 writes).
            total_steps: the run's length, for the console line.
            global_batch: triplets per step, for the throughput.
            backbone: open_clip model name (the attention images undo its normalisation).
            rank, start_step: this rank, and the step the run (re)starts from.
            model: the network, for the attention-map images.
            partitioned: weights are partitioned (ZeRO-3), so every rank joins the attention-image forward.
            text_cc: the step computes the Text-CC maps and isolated pass (counted in perf/mfu).
            console: log a step line every `logging.every` steps (the driver's progress bar replaces it).
        """
        self.settings = settings
        self.run_dir = Path(run_dir)
        self.total_steps = total_steps
        self.global_batch = global_batch
        self.backbone = backbone
        self.partitioned = partitioned
        self.rank = rank
        self.model = model
        self.device = torch.device(device)
        self.writer = None
        self.metrics = None
        self.text_cc = text_cc
        self.console = console
        self.peak_flops = self._peak_flops()
        if rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            run_dir = self.run_dir
            run_dir.mkdir(parents=True, exist_ok=True)
            # purge_step drops events a crashed attempt logged after the checkpoint we resume from.
            self.writer = SummaryWriter(
                str(run_dir / TENSORBOARD_DIR), purge_step=start_step + 1 if start_step else None
            )
            if (run_dir / METRICS_FILE).is_file():
                dropped = drop_steps_after(run_dir / METRICS_FILE, start_step)
                if dropped:
                    logger.info(
                        "metrics.jsonl: dropped %d records after step %d (this attempt logs them again)",
                        dropped,
                        start_step,
                    )
            self.metrics = open(run_dir / METRICS_FILE, "a")
            # The pid tells an operator (or a recovery test) which process rank 0 of this attempt is.
            self._append({"event": "start", "from_step": start_step, "pid": os.getpid(), "host": socket.gethostname()})

    def _peak_flops(self) -> float | None:
        if self.device.type != "cuda":
            return None
        name = torch.cuda.get_device_name(self.device)
        peak = peak_bf16_flops(name, self.settings.peak_tflops)
        if peak is None:
            logger.warning("no bf16 peak known for %s: set logging.peak_tflops to get perf/mfu", name)
        return peak

    def _append(self, record: dict[str, Any]) -> None:
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()

    def log_step(self, state, result, step_time: float, data_wait: float, batches: list[dict[str, Any]]) -> None:
        """Record one finished step (every rank calls it; only rank 0 writes).

        Args:
            state: `TrainState` after the step.
            result: the loop's `StepResult`.
            step_time: wall seconds of the step, data wait included.
            data_wait: seconds spent waiting for the step's batches.
            batches: the step's micro-batches on this rank (attention-map images, the FLOPs of perf/mfu).
        """
        step, every = state.step, self.settings
        if step % every.image_every == 0 and hasattr(self.model, "concept_maps"):  # phi and TisCIR draw none
            self._log_attention(step, batches[0])
        if self.rank != 0:
            return
        record = {
            "step": step,
            **{name: _finite_or_none(value) for name, value in result.metrics.items()},
            "lr": result.lr,
            "grad_norm": None if result.grad_norm is None else _finite_or_none(result.grad_norm),
            "skipped": result.skipped,
            "skipped_steps": state.skipped_steps,
            "samples": state.samples_seen,
            "digest": result.digest,
            "step_time_s": step_time,
            "data_wait_s": data_wait,  # part of step_time_s: a large share means the step is loader-bound
        }
        self._append(record)
        if step % every.every and not result.skipped:
            return
        scalars = {f"train/{name}": value for name, value in result.metrics.items() if "/" not in name}
        scalars |= {name: value for name, value in result.metrics.items() if "/" in name}
        scalars |= {
            "train/lr": result.lr,
            "train/skipped_steps": state.skipped_steps,
            "perf/triplets_per_s": self.global_batch / step_time,
            "perf/step_time_s": step_time,
            "perf/data_wait_frac": data_wait / step_time,
        }
        if result.grad_norm is not None:
            scalars["train/grad_norm"] = result.grad_norm
        if self.device.type == "cuda":
            scalars["perf/gpu_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            if self.peak_flops and hasattr(self.model, "fusion"):  # the analytic count is ConText-CIR's
                # Every rank runs the same model on equal batches: one rank's FLOPs over one GPU's peak.
                flops = sum(step_flops(self.model, StepShape.of(batch), self.text_cc) for batch in batches)
                scalars["perf/mfu"] = flops / step_time / self.peak_flops
        for name, value in scalars.items():
            if value is not None and math.isfinite(value):
                self.writer.add_scalar(name, value, step)
        if not self.console:
            return
        logger.info(
            "step %d/%d loss %.4f lr %.3g grad %s skipped %d | %.1f triplets/s %.3f s/step data %.0f%%",
            step,
            self.total_steps,
            result.metrics.get("loss", float("nan")),
            result.lr,
            "n/a" if result.grad_norm is None else f"{result.grad_norm:.3g}",
            state.skipped_steps,
            scalars["perf/triplets_per_s"],
            step_time,
            100 * scalars["perf/data_wait_frac"],
        )

    @torch.no_grad()
    def _log_attention(self, step: int, batch: dict[str, Any]) -> None:
        """NP attention maps of the first `logging.num_images` samples, drawn over their reference images."""
        if self.rank != 0 and not self.partitioned:  # with ZeRO-3 every rank runs the forward to gather weights
            return
        count = min(self.settings.num_images, batch["reference_image"].shape[0])
        tensors = {
            name: batch[name][:count].to(self.device)
            for name in ("reference_image", "caption_ids", "np_spans", "np_mask")
        }
        was_training = self.model.training
        self.model.eval()
        try:
            maps = self.model.concept_maps(**tensors)
        finally:
            self.model.train(was_training)
        if self.rank != 0:
            return
        grid = attention_grid(
            tensors["reference_image"].cpu(),  # uint8 pixels from the reader; `attention_grid` reads either kind
            maps.float().cpu(),
            tensors["np_mask"].cpu(),
            batch["noun_phrases"][:count],
            self.backbone,
        )
        self.writer.add_image("attention/np_maps", np.asarray(grid), step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.metrics is not None:
            self.metrics.close()
