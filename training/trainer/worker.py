"""What every training worker runs: build, resume, loop, close. Ray (`cluster/`) calls `train_worker` on each rank
after setting up torch.distributed; tests call it under a plain gloo process group."""

from __future__ import annotations

import dataclasses
import logging
import os
import random
from functools import partial

import numpy as np
import torch

from training.checkpoint import layout, owner_lease
from training.checkpoint.checkpointer import Checkpointer
from training.checkpoint.pieces import ConsolidatedWeights, EngineState, ResolvedConfig, RngState
from training.config_loader import to_yaml
from training.engine.deepspeed_engine import build_engine, deepspeed_config
from training.engine.distributed import rank_and_world
from training.errors import PermanentError
from training.model.towers import with_tower_flags
from training.monitor.run_monitor import Monitor
from training.trainer.job import TrainJob
from training.trainer.loop import LoopContext, run
from training.trainer.state import TrainState

logger = logging.getLogger(__name__)


class WorldSizeMismatch(PermanentError, ValueError):
    """The process group Ray built is not the size the config asks for (every restart builds the same one)."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_monitor(
    config: TrainJob, rank: int, start_step: int, model: torch.nn.Module, device, console: bool = True
) -> Monitor:
    """The rank's monitor: TensorBoard, metrics.jsonl and (unless the driver draws progress) console lines."""
    return Monitor(
        config.logging,
        config.run_dir,
        total_steps=config.train.steps,
        global_batch=config.train.global_batch,
        backbone=config.model.backbone,
        rank=rank,
        start_step=start_step,
        model=model,
        device=device,
        partitioned=config.deepspeed.zero_stage == 3,
        text_cc=config.loss.lambda_cc > 0 and config.train.objective == "context",
        console=console,
    )


def build_checkpointer(
    config: TrainJob, engine, model: torch.nn.Module, reader, state: TrainState, owner: str | None = None
) -> Checkpointer:
    """The run's checkpoints as named pieces: engine (model, AdamW, schedule), weights, config, reader, RNG, train.

    `owner`: the token of the driver's lease on the run; checkpoints are published only while it holds.
    """
    return Checkpointer(
        config.run_dir,
        config.checkpoint.keep,
        files={
            "engine": EngineState(engine),
            "weights": ConsolidatedWeights(engine, model),
            "config": ResolvedConfig(to_yaml(config)),
        },
        per_rank={"reader": reader, "rng": RngState()},
        per_run={"train": state},
        may_publish=None if owner is None else partial(owner_lease.check, config.run_dir, owner),
    )


def build_objective(config: TrainJob) -> torch.nn.Module:
    """The module the engine wraps: the network plus the losses `train.objective` selects."""
    if config.train.objective == "towers":
        from training.objectives.tower_pretraining import TowerPretrainObjective

        return TowerPretrainObjective(config.model, config.pretrain)
    if config.train.objective in ("phi", "tiscir"):
        from training.zeroshot.networks import build_method_objective

        return build_method_objective(config.train.objective, config.model, config.methods)
    from training.objectives.context_cir import ConTextObjective

    return ConTextObjective(config.model, config.loss)


def train_worker(
    config: TrainJob, local_rank: int | None = None, console: bool = True, owner: str | None = None
) -> TrainState:
    """Train this rank until `train.steps`, resuming from the run's latest complete checkpoint when there is one.

    Args:
        config: the validated config (same on every rank).
        local_rank: this rank's GPU index on its node; defaults to `$LOCAL_RANK` or 0.
        console: print a step line every `logging.every` steps (off when the driver draws a progress bar).
        owner: the token of the driver's lease on the run (`training.checkpoint.owner_lease`); None when nothing
            owns it (a test calling this directly).

    Returns:
        The final `TrainState`.

    Raises:
        WorldSizeMismatch: the process group's size differs from `cluster.num_workers`.
        training.trainer.loop.NonFiniteAbort: `train.max_consecutive_skips` non-finite steps in a row.
        training.checkpoint.owner_lease.OwnerGone: the driver that owns the run is gone; nothing is published.
        training.errors.PermanentError: these and every other failure that a restart would meet again.
    """
    # Our own progress at INFO; libraries (open_clip narrates every model it builds) only from WARNING.
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s")  # a no-op where Ray set up handlers
    logging.getLogger().setLevel(logging.WARNING)  # open_clip logs on the root logger
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime" on every CPU rank
    for ours in ("training", "shards"):
        logging.getLogger(ours).setLevel(logging.INFO)
    config = dataclasses.replace(config, model=with_tower_flags(config.model))  # checkpoints record the flags
    rank, world = rank_and_world()
    if world != config.world_size:
        raise WorldSizeMismatch(f"the process group has {world} ranks but cluster.num_workers={config.world_size}")
    local_rank = int(os.environ.get("LOCAL_RANK", 0)) if local_rank is None else local_rank
    os.environ["LOCAL_RANK"] = str(local_rank)
    if config.use_gpu:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")

    from shards.stream.reader import build_reader
    from training.model.weights import load_model_weights

    seed_everything(config.train.seed)  # identical initial weights on every rank
    objective = build_objective(config)
    resume = layout.latest_complete(config.run_dir)
    if resume is None and config.model.init_from:
        load_model_weights(objective.model, config.model.init_from)
        logger.info("initialised weights from %s", config.model.init_from)
    objective.to(device)
    engine, _, _ = build_engine(
        objective, config.optim, deepspeed_config(config.deepspeed, config.batch, config.use_gpu)
    )
    reader = build_reader(config.data, config.model.backbone, config.train.micro_batch, rank, world)
    seed_everything(config.train.seed + 1 + rank)  # per-rank streams from here on
    state = TrainState()
    checkpointer = build_checkpointer(config, engine, objective.model, reader, state, owner)
    if resume is not None:
        checkpointer.load(resume[1])
        logger.info("resumed from %s at step %d", resume[1], state.step)
    elif rank == 0:
        logger.info("starting run %s from scratch", config.run_dir)
    monitor = build_monitor(config, rank, state.step, objective.model, device, console)
    try:
        run(LoopContext(engine, reader, monitor, checkpointer, config, device, state))
    finally:
        monitor.close()
        reader.close()
    if rank == 0:
        logger.info("run %s finished at step %d (%d skipped)", config.run_dir, state.step, state.skipped_steps)
    return state
