"""Errors that recur on every retry of the worker group, so restarting it only wastes time before the same failure.

Ray restarts a failed worker group up to `cluster.max_failures` times, which is right for a killed worker or a lost
node. A `PermanentError` says that a restart cannot help: the cause lives in the config, in the run's checkpoints
or on its storage, and an exact resume (same data, same seed) replays it. The cluster's failure policy
(`cluster/runtime/failure_policy.py`) ends the job at the first one, and the driver prints its message as one line.

Subclasses: `training.checkpoint.pieces.CheckpointLoadError` (a latest checkpoint that cannot be resumed from),
`training.checkpoint.checkpointer.CheckpointWriteError` (a full disk), `training.checkpoint.owner_lease.OwnerGone`
(the driver that owns the run is gone), `training.config_loader.ConfigError`, `training.trainer.worker.
WorldSizeMismatch` and `training.trainer.loop.NonFiniteAbort` (the resumed steps diverge again).
"""

from __future__ import annotations


class PermanentError(Exception):
    """A failure that the same job would meet again after a restart. The message is one line for the user."""
