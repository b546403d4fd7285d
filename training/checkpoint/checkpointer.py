"""Saving and loading a checkpoint as a set of named pieces (layout: `training.checkpoint.layout`).

    deepspeed/            engine state: module, AdamW moments, LR schedule (DeepSpeed's own files, per rank)
    model.safetensors     consolidated weights for the eval job (rank 0; gathered first under ZeRO-3)
    config.yaml           the resolved config
    trainer_state.json    step, samples seen, skip counters, and for every rank its reader position and RNG states
    COMPLETE              last, by atomic rename; then `latest` is repointed and old checkpoints are pruned

Every rank calls `save_checkpoint` and `load_checkpoint` (both contain collectives). Nothing here unpickles:
the engine loads through `training.engine.safe_checkpoint_engine`, weights are safetensors, the rest is JSON.
"""

from __future__ import annotations

import base64
import json
import logging
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training import faults
from training.checkpoint import layout
from training.config_loader import RootConfig, to_yaml
from training.engine.distributed import all_gather_json, barrier, rank_and_world

logger = logging.getLogger(__name__)

TRAINER_STATE_VERSION = 1


@dataclass
class TrainState:
    """Progress of a run: what `trainer_state.json` records besides the per-rank pieces."""

    step: int = 0
    """Optimizer steps taken (skipped ones included: they consumed their batches)."""
    samples_seen: int = 0
    """Triplets consumed over all ranks."""
    skipped_steps: int = 0
    """Steps skipped because the loss or a gradient was non-finite on some rank."""
    consecutive_skips: int = 0
    """Skipped steps in a row up to `step`."""


def rng_state() -> dict[str, Any]:
    """This process's python, numpy and torch RNG states as JSON-ready values."""
    version, internal, gauss = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state(legacy=True)
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(position), int(has_gauss), float(cached)],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["cuda"])), dtype=torch.uint8))


def _write_weights(engine, model: torch.nn.Module, path: Path, rank: int) -> None:
    """Consolidated `model.safetensors` of the network (all ranks call it: ZeRO-3 gathers collectively)."""
    from training.model.context_cir import save_model_weights

    if engine.zero_optimization_stage() != 3:
        if rank == 0:
            save_model_weights(model, path)
        return
    import deepspeed
    from safetensors.torch import save_file

    # Gather one parameter at a time (bounded memory); modifier_rank=None: nothing is written back, which also
    # avoids DeepSpeed's re-broadcast that cannot handle 0-d parameters such as open_clip's logit_scale.
    weights: dict[str, torch.Tensor] = {}
    parameters = dict(model.named_parameters())
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name in parameters:
            with deepspeed.zero.GatheredParameters([tensor], modifier_rank=None):
                if rank == 0:
                    weights[name] = tensor.detach().clone().cpu()
        elif rank == 0:
            weights[name] = tensor.detach().contiguous().cpu()  # buffers are never partitioned
    if rank == 0:
        save_file(weights, str(path))


def save_checkpoint(engine, model: torch.nn.Module, reader, config: RootConfig, state: TrainState) -> Path:
    """Write the checkpoint of `state.step` under the run directory and publish it.

    Args:
        engine: the DeepSpeed engine (wrapping the objective).
        model: the network itself (`objective.model`), for `model.safetensors`.
        reader: this rank's `ShardStream`; its position goes into `trainer_state.json`.
        config: the resolved config (saved as `config.yaml`).
        state: progress at the step being saved.

    Returns:
        The checkpoint directory.
    """
    rank, world = rank_and_world()
    run_dir = config.run_dir
    path = layout.checkpoint_dir(run_dir, state.step)
    if rank == 0:
        if path.exists():
            # Only a crashed attempt leaves a directory at a step beyond the checkpoint we resumed from.
            logger.warning("removing unfinished checkpoint %s left by an earlier attempt", path)
            shutil.rmtree(path)
        path.mkdir(parents=True)
    barrier()
    engine.save_checkpoint(str(path), tag=layout.DEEPSPEED, save_latest=False)
    _write_weights(engine, model, path / layout.WEIGHTS, rank)
    per_rank = all_gather_json({"reader": reader.state_dict(), "rng": rng_state()})
    if rank == 0:
        (path / layout.CONFIG).write_text(to_yaml(config))
        trainer_state = {
            "version": TRAINER_STATE_VERSION,
            "world_size": world,
            "train": asdict(state),
            "ranks": per_rank,
        }
        (path / layout.TRAINER_STATE).write_text(json.dumps(trainer_state))
    barrier()  # every rank's DeepSpeed files are on storage before the marker says so
    faults.maybe_kill("checkpoint", state.step, rank, run_dir)
    if rank == 0:
        layout.mark_complete(path, f"step {state.step}\n")
        layout.update_latest_pointer(run_dir, state.step)
        prune(run_dir, config.checkpoint.keep)
        logger.info("checkpoint %s complete", path)
    barrier()
    return path


def prune(run_dir: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints, and unfinished ones older than the newest."""
    complete = layout.complete_checkpoints(run_dir)
    if not complete:
        return
    newest_step = complete[-1][0]
    for _, old in complete[:-keep] if keep < len(complete) else []:
        shutil.rmtree(old, ignore_errors=True)
    root = layout.checkpoints_root(run_dir)
    for child in root.iterdir():
        step = layout.step_of(child)
        if step is not None and step < newest_step and child.is_dir() and not layout.is_complete(child):
            shutil.rmtree(child, ignore_errors=True)


def load_checkpoint(engine, path: str | Path, reader) -> TrainState:
    """Load every piece of a complete checkpoint into this rank: engine, reader position, RNG states.

    Raises:
        ValueError: the checkpoint is incomplete or was written by a different number of ranks.
    """
    path = Path(path)
    if not layout.is_complete(path):
        raise ValueError(f"refusing to load incomplete checkpoint {path} (no {layout.MARKER} marker)")
    rank, world = rank_and_world()
    saved = json.loads((path / layout.TRAINER_STATE).read_text())
    if saved.get("version") != TRAINER_STATE_VERSION:
        raise ValueError(f"{path / layout.TRAINER_STATE}: unknown version {saved.get('version')}")
    if saved["world_size"] != world:
        raise ValueError(
            f"{path} was written by {saved['world_size']} ranks, this run has {world}: an exact resume needs the "
            "same cluster.num_workers (or start a new run with model.init_from=<checkpoint>/model.safetensors)"
        )
    loaded, _ = engine.load_checkpoint(str(path), tag=layout.DEEPSPEED)
    if loaded is None:
        raise ValueError(f"DeepSpeed found no engine state under {path / layout.DEEPSPEED}")
    mine = saved["ranks"][rank]
    reader.load_state_dict(mine["reader"])
    set_rng_state(mine["rng"])
    state = TrainState(**saved["train"])
    logger.info("resumed from %s at step %d", path, state.step)
    return state


def fresh_start_conflict(config: RootConfig) -> str | None:
    """With `checkpoint.resume=false`: why starting would clobber an existing run, or None when it would not.

    A fresh start never deletes or overwrites checkpoints silently; the user picks a new `cluster.run_name` or
    resumes. (Once a fresh job is running, a worker group that Ray restarts does resume from the checkpoints
    this same job wrote.)
    """
    if config.checkpoint.resume:
        return None
    root = layout.checkpoints_root(config.run_dir)
    existing = (
        sorted(child.name for child in root.iterdir() if layout.step_of(child) is not None) if root.is_dir() else []
    )
    if not existing:
        return None
    return (
        f"checkpoint.resume=false but run {config.cluster.run_name!r} already has checkpoints in {root} "
        f"({', '.join(existing[-3:])}); choose a new cluster.run_name, or set checkpoint.resume=true to continue it"
    )
