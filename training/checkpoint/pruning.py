"""Which checkpoints of a run are deleted, and when: keep the newest `checkpoint.keep` complete ones, except those a
live eval watcher has yet to score (`training.checkpoint.watch_lease`).

Pruning runs at three moments:

- after the trainer publishes a checkpoint (`Checkpointer.save`), with the job's own `checkpoint.keep`;
- after the eval watcher scores a checkpoint and so releases it, and when the watcher stops (its lease is gone):
  `prune_released`, with the `checkpoint.keep` the run itself recorded. Without this, every checkpoint a watcher
  protected would stay on disk once the run had saved its last one, since nothing else prunes after that.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from training.checkpoint import layout, watch_lease
from training.checkpoint.config import CheckpointConfig

logger = logging.getLogger(__name__)


def prune(run_dir: str | Path, keep: int) -> list[int]:
    """Delete all but the newest `keep` complete checkpoints, and unfinished ones older than the newest.

    A complete checkpoint that a live eval watcher has yet to score stays (`training.checkpoint.watch_lease`).
    Unfinished checkpoints newer than the newest complete one are being written and stay too.

    Returns:
        The steps of the complete checkpoints deleted.
    """
    complete = layout.complete_checkpoints(run_dir)
    if not complete:
        return []
    newest_step = complete[-1][0]
    claimed_after = watch_lease.claimed_after(run_dir)
    held, deleted = [], []
    for step, old in complete[:-keep] if keep < len(complete) else []:
        if claimed_after is not None and step > claimed_after:
            held.append(step)
            continue
        shutil.rmtree(old, ignore_errors=True)
        deleted.append(step)
    if held:
        logger.info("kept checkpoints %s past checkpoint.keep=%d: the eval watcher has not scored them yet", held, keep)
    root = layout.checkpoints_root(run_dir)
    for child in root.iterdir():
        step = layout.step_of(child)
        if step is not None and step < newest_step and child.is_dir() and not layout.is_complete(child):
            shutil.rmtree(child, ignore_errors=True)
    return deleted


def saved_keep(run_dir: str | Path) -> int | None:
    """`checkpoint.keep` as the run's newest complete checkpoint recorded it in its `config.yaml`; None when there is
    no checkpoint or its config cannot be read.

    The run's own value, not the reader's: an eval job started with another config (or without the trainer's
    command-line overrides) must never delete checkpoints the run meant to keep.
    """
    from training.config_loader import ConfigError, load_section

    complete = layout.complete_checkpoints(run_dir)
    if not complete:
        return None
    config_file = complete[-1][1] / layout.CONFIG
    try:
        return load_section(config_file, "checkpoint", CheckpointConfig).keep
    except (ConfigError, OSError, ValueError) as error:
        logger.warning("not pruning %s: cannot read checkpoint.keep from %s (%s)", run_dir, config_file, error)
        return None


def prune_released(run_dir: str | Path) -> list[int]:
    """Prune by the run's recorded `checkpoint.keep` what no live watcher claims any more; the eval watcher calls it
    each time it releases a checkpoint and when it stops. Nothing is deleted when that value cannot be read.

    Returns:
        The steps of the complete checkpoints deleted.
    """
    keep = saved_keep(run_dir)
    if keep is None:
        return []
    try:
        deleted = prune(run_dir, keep)
    except OSError as error:  # shared storage trouble: the next release or save prunes again
        logger.warning("could not prune %s: %s", run_dir, error)
        return []
    if deleted:
        logger.info(
            "pruned checkpoints %s of %s (checkpoint.keep=%d): the eval watcher released them", deleted, run_dir, keep
        )
    return deleted
