"""Saving and loading a checkpoint as a set of named pieces (`training.checkpoint.pieces`; layout: `layout`).

    deepspeed/            engine: model, AdamW moments, LR schedule (DeepSpeed's own files, per rank)
    model.safetensors     weights: consolidated for the eval job (rank 0; gathered first under ZeRO-3)
    config.yaml           config: the resolved config
    trainer_state.json    version, world size, every run-wide piece by name (`train`), and under `ranks` every
                          rank's own pieces by name (`reader`, `rng`)
    COMPLETE              last, by atomic rename; then `latest` is repointed and old checkpoints are pruned

Every rank calls `Checkpointer.save` and `Checkpointer.load` (both contain collectives). Nothing here unpickles:
the engine loads with `weights_only=True`, weights are safetensors, the rest is JSON.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

from training.checkpoint import layout
from training.checkpoint.pieces import CheckpointLoadError, FilePiece, Stateful
from training.checkpoint.pruning import prune
from training.engine.distributed import all_gather_json, barrier, rank_and_world
from training.errors import PermanentError

logger = logging.getLogger(__name__)

TRAINER_STATE_VERSION = 1
_RESERVED = ("version", "world_size", "ranks")


class Checkpointer:
    """Writes and reads the checkpoints of one run from a fixed set of named pieces.

    Args:
        run_dir: `<storage>/<run>`; checkpoints go to `<run_dir>/checkpoints/step_XXXXXXXX/`.
        keep: complete checkpoints kept after each save.
        files: pieces that write their own files (saved and loaded in this order).
        per_rank: JSON pieces every rank holds its own of (a reader position, RNG streams).
        per_run: JSON pieces equal on every rank, stored once (the train state).
        may_publish: called on rank 0 just before a written checkpoint is published; it raises to refuse (the
            driver that owns the run is gone: `training.checkpoint.owner_lease.check`). None: always publish.
    """

    def __init__(
        self,
        run_dir: str | Path,
        keep: int,
        files: Mapping[str, FilePiece],
        per_rank: Mapping[str, Stateful],
        per_run: Mapping[str, Stateful],
        may_publish: Callable[[], None] | None = None,
    ) -> None:
        clash = [name for name in per_run if name in _RESERVED]
        if clash:
            raise ValueError(f"run-wide checkpoint pieces may not be named {clash}")
        self.run_dir = Path(run_dir)
        self.keep = keep
        self.files = dict(files)
        self.per_rank = dict(per_rank)
        self.per_run = dict(per_run)
        self.may_publish = may_publish

    def save(self, step: int) -> Path:
        """Write every piece for `step`, then publish the checkpoint (marker, `latest`) and prune old ones.

        Returns:
            The checkpoint directory.
        """
        rank, world = rank_and_world()
        path = layout.checkpoint_dir(self.run_dir, step)
        if rank == 0:
            if path.exists():
                # Only a crashed attempt leaves a directory at a step beyond the checkpoint we resumed from.
                logger.warning("removing unfinished checkpoint %s left by an earlier attempt", path)
                shutil.rmtree(path)
            path.mkdir(parents=True)
        barrier()
        writing = ""
        try:
            for name, piece in self.files.items():
                writing = name  # named in the error when the write fails
                piece.save(path, rank)
            writing = "trainer state"
            ranks = all_gather_json({name: piece.state_dict() for name, piece in self.per_rank.items()})
            if rank == 0:
                trainer_state = {
                    "version": TRAINER_STATE_VERSION,
                    "world_size": world,
                    **{name: piece.state_dict() for name, piece in self.per_run.items()},
                    "ranks": ranks,
                }
                (path / layout.TRAINER_STATE).write_text(json.dumps(trainer_state))
        except OSError as error:
            raise _failed_write(path, writing, rank, error) from error
        barrier()  # every rank's files are on storage before the marker says so
        if rank == 0:
            if self.may_publish is not None:
                self.may_publish()  # last, so that nothing is published once the owner has gone
            layout.mark_complete(path, f"step {step}\n")
            layout.update_latest_pointer(self.run_dir, step)
            prune(self.run_dir, self.keep)
            logger.info("checkpoint %s complete", path)
        barrier()
        return path

    def load(self, path: str | Path) -> None:
        """Load every piece of a complete checkpoint back into this rank.

        Raises:
            CheckpointLoadError: the checkpoint is incomplete, of an unknown version, lacks a piece, was written by
                a different number of ranks, or has an unreadable engine state.
        """
        path = Path(path)
        if not layout.is_complete(path):
            raise CheckpointLoadError(f"refusing to load incomplete checkpoint {path} (no {layout.MARKER} marker)")
        rank, world = rank_and_world()
        saved = json.loads((path / layout.TRAINER_STATE).read_text())
        if saved.get("version") != TRAINER_STATE_VERSION:
            raise CheckpointLoadError(f"{path / layout.TRAINER_STATE}: unknown version {saved.get('version')}")
        if saved["world_size"] != world:
            raise CheckpointLoadError(
                f"{path} was written by {saved['world_size']} ranks, this run has {world}: an exact resume needs the "
                "same cluster.num_workers (or start a new run with model.init_from=<checkpoint>/model.safetensors)"
            )
        mine = saved["ranks"][rank]
        missing = [name for name in self.per_run if name not in saved] + [n for n in self.per_rank if n not in mine]
        if missing:
            raise CheckpointLoadError(f"{path / layout.TRAINER_STATE} lacks the piece(s) {missing}")
        for piece in self.files.values():
            piece.load(path)
        for name, piece in self.per_rank.items():
            piece.load_state_dict(mine[name])
        for name, piece in self.per_run.items():
            piece.load_state_dict(saved[name])


class CheckpointWriteError(PermanentError, OSError):
    """A checkpoint could not be written (a full disk, a lost mount). Its partial files are already removed.

    Permanent: the next attempt would write the same checkpoint to the same storage; the user frees space first.
    """


def _failed_write(path: Path, writing: str, rank: int, error: OSError) -> CheckpointWriteError:
    """Remove what a failed save left, so it frees the space it took, and say what failed where and what is free.

    The checkpoint never got its marker, so nothing would ever load it; the other ranks' writes into the same
    directory fail with it, and a retry starts the step's checkpoint again from nothing.
    """
    shutil.rmtree(path, ignore_errors=True)
    try:
        usage = shutil.disk_usage(path.parent)
        free = f"{usage.free / 2**30:.2f} GiB free of {usage.total / 2**30:.1f} GiB on {path.parent}"
    except OSError as usage_error:
        free = f"free space unknown ({usage_error})"
    return CheckpointWriteError(
        error.errno,
        f"rank {rank} could not write the {writing!r} piece of checkpoint {path} ({error.strerror or error}); "
        f"its partial files are removed; {free}",
    )


def resume_problem(run_dir: str | Path, world_size: int) -> str | None:
    """Why resuming this run with `world_size` ranks cannot work, or None; read on the driver, before Ray starts.

    An exact resume restores every rank's reader position and DeepSpeed's per-rank state, so it needs the number
    of ranks the latest complete checkpoint was written by.
    """
    latest = layout.latest_complete(run_dir)
    if latest is None:
        return None
    _, path = latest
    state_file = path / layout.TRAINER_STATE
    try:
        saved = int(json.loads(state_file.read_text())["world_size"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        return (
            f"{state_file} is unreadable ({type(error).__name__}: {error}); move {path.name} out of "
            f"{path.parent} to resume from the checkpoint before it"
        )
    if saved != world_size:
        return (
            f"{path} was written by {saved} worker(s), and this submission has cluster.num_workers={world_size}. "
            f"Resume with cluster.num_workers={saved}, or start a new run from its weights: "
            f"cluster.run_name=<new name> model.init_from={path / layout.WEIGHTS}"
        )
    return None


def fresh_start_conflict(run_dir: str | Path, resume: bool) -> str | None:
    """With `checkpoint.resume=false`: why starting would clobber an existing run, or None when it would not.

    A fresh start never deletes or overwrites checkpoints silently; the user picks a new `cluster.run_name` or
    resumes. (Once a fresh job is running, a worker group that Ray restarts does resume from the checkpoints
    this same job wrote.)
    """
    if resume:
        return None
    root = layout.checkpoints_root(run_dir)
    existing = (
        sorted(child.name for child in root.iterdir() if layout.step_of(child) is not None) if root.is_dir() else []
    )
    if not existing:
        return None
    return (
        f"checkpoint.resume=false but run {Path(run_dir).name!r} already has checkpoints in {root} "
        f"({', '.join(existing[-3:])}); choose a new cluster.run_name, or set checkpoint.resume=true to continue it"
    )
