"""The per-worker training loop: next batch -> step -> log -> maybe checkpoint.

A step runs `accumulation` micro-batches through the DeepSpeed engine. Before the optimizer update the ranks
agree (one all-reduce) on whether any of them saw a non-finite loss or gradient; if so, every rank skips the
update, leaving parameters and Adam moments untouched, and the skip is counted. K skips in a row abort.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from shards.stream.decode import DATA_PROBLEMS
from training.checkpoint.checkpointer import Checkpointer
from training.engine.deepspeed_engine import local_grad_norm
from training.engine.distributed import all_reduce_sum, chain_digests, rank_and_world
from training.errors import PermanentError
from training.model.batch_layout import BatchLayout
from training.trainer.job import TrainJob
from training.trainer.state import TrainState


class NonFiniteAbort(PermanentError, RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient (a restart resumes exactly, so it replays them)."""


@dataclass
class StepResult:
    """What one optimizer step produced, identical on every rank."""

    metrics: dict[str, float]
    """`loss` and every objective output, averaged over micro-batches and ranks; with the reader's problem counts,
    also `data/<kind>` for each kind of `DATA_PROBLEMS`, summed over ranks (since the run started)."""
    lr: float
    """Learning rate the step used (or would have used, when skipped)."""
    grad_norm: float | None
    """Global gradient 2-norm before clipping."""
    skipped: bool
    digest: str = ""
    """Digest of the sample keys this rank consumed in the step (rank 0's is logged)."""


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch on `device`, with its `layout` (the sizes the forward needs) read first from the host tensors.

    The copies are asynchronous: a blocking copy from the reader's pinned memory would make the host wait for the
    GPU to finish the previous micro-batch's backward.
    """
    layout = BatchLayout.of_batch(batch)
    moved = {
        name: value.to(device, non_blocking=True) if torch.is_tensor(value) else value for name, value in batch.items()
    }
    if layout is not None:
        moved["layout"] = layout.to(device)
    return moved


def train_step(
    engine, micro_batches: list[dict[str, Any]], device: torch.device, problems: dict[str, int] | None = None
) -> StepResult:
    """Forward and backward every micro-batch, then apply the update unless some rank saw a non-finite value.

    `problems` (this rank's reader counts: corrupt samples, truncated shards, ...) ride the step's one collective.
    """
    totals: dict[str, torch.Tensor] = {}
    for index, batch in enumerate(micro_batches):
        outputs = engine(to_device(batch, device))
        loss = sum(value for name, value in outputs.items() if name.endswith("_loss"))
        engine.backward(loss)
        for name, value in {"loss": loss, **outputs}.items():
            if torch.is_tensor(value) and value.numel() == 1:  # stays on the device: no sync per micro-batch
                totals[name] = totals.get(name, 0.0) + value.detach().float().reshape(())
        if index < len(micro_batches) - 1:
            engine.step()  # inside the accumulation window DeepSpeed only counts the micro-step
    names = sorted(totals)
    norm = local_grad_norm(engine.module).to(totals["loss"].device)
    local_bad = (~torch.isfinite(totals["loss"]) | ~torch.isfinite(norm)).float()
    _, world = rank_and_world()
    # One collective per step carries the skip vote and every logged value.
    counted = [] if problems is None else [float(problems.get(kind, 0)) for kind in DATA_PROBLEMS]
    # non_blocking: a plain host -> GPU copy would wait for the backward here, a second host sync per step.
    counts = torch.tensor(counted, dtype=torch.float32).to(totals["loss"].device, non_blocking=True)
    summed = all_reduce_sum(torch.cat([torch.stack([local_bad] + [totals[name] for name in names]), counts]))
    skip = bool(summed[0] > 0)
    lr = engine.basic_optimizer.param_groups[0]["lr"]
    with engine.basic_optimizer.skipping(skip):
        engine.step()
    skipped = skip or not engine.was_step_applied()  # DeepSpeed's ZeRO optimizers also refuse non-finite grads
    engine_norm = engine.get_global_grad_norm()
    grad_norm = float(engine_norm) if engine_norm is not None else float(norm)
    metrics = {name: float(summed[1 + i]) / (world * len(micro_batches)) for i, name in enumerate(names)}
    metrics |= {
        f"data/{kind}": float(summed[1 + len(names) + i]) for i, kind in enumerate(DATA_PROBLEMS[: len(counted)])
    }
    return StepResult(metrics, lr, grad_norm, skipped)


@dataclass
class LoopContext:
    """Everything the loop touches, built by `training.trainer.worker`."""

    engine: Any
    reader: Any
    monitor: Any
    checkpointer: Checkpointer
    config: TrainJob
    device: torch.device
    state: TrainState = field(default_factory=TrainState)
    """Mutated in place: the checkpointer saves and restores this same object."""


def run(context: LoopContext) -> TrainState:
    """Train from `context.state.step` to `train.steps`, checkpointing every `checkpoint.every_steps` and at the end."""
    config, state, engine = context.config, context.state, context.engine
    accumulation = config.accumulation_steps
    batches = iter(context.reader)
    # This rank's sample keys since the last checkpoint: hashed on the host, combined over ranks only when a
    # checkpoint is written (no collective and no device sync per step).
    segment = hashlib.sha256()
    while state.step < config.train.steps:
        started = time.perf_counter()
        micro_batches = [next(batches) for _ in range(accumulation)]
        data_wait = time.perf_counter() - started
        result = train_step(engine, micro_batches, context.device, getattr(context.reader, "stats", None))
        keys = "\n".join(key for batch in micro_batches for key in batch["keys"]).encode()
        result.digest = hashlib.sha256(keys).hexdigest()[:16]
        segment.update(keys + b"\n")
        state.step += 1
        state.samples_seen += config.train.global_batch
        state.skipped_steps += result.skipped
        state.consecutive_skips = state.consecutive_skips + 1 if result.skipped else 0
        context.monitor.log_step(state, result, time.perf_counter() - started, data_wait, micro_batches)
        if state.consecutive_skips >= config.train.max_consecutive_skips:
            raise NonFiniteAbort(
                f"aborting at step {state.step}: {state.consecutive_skips} consecutive steps had a non-finite loss "
                f"or gradient (train.max_consecutive_skips={config.train.max_consecutive_skips}); lower optim.lr, "
                "check the data, or resume from an earlier checkpoint"
            )
        if state.step % config.checkpoint.every_steps == 0 or state.step == config.train.steps:
            state.data_digest = chain_digests(state.data_digest, segment.digest())
            segment = hashlib.sha256()
            context.checkpointer.save(state.step)
    return state
