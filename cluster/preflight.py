"""What the driver checks before Ray starts: problems that would recur on every retry of the worker group.

Inside the workers such a problem surfaced only after Ray and DeepSpeed had started, and Ray then retried it
`cluster.max_failures` times. Here it stops the submission at once with one line and exit code 2.
"""

from __future__ import annotations

from cluster.root_config import RootConfig
from shards.storage import ShardStorageError


def startup_problems(config: RootConfig) -> list[str]:
    """Every problem found, each a line naming the key or file and what to do; empty when the job can start."""
    from shards.stream.reader import shard_store, verified_index
    from training.checkpoint.checkpointer import fresh_start_conflict, resume_problem

    problems = []
    conflict = fresh_start_conflict(config.run_dir, config.checkpoint.resume)
    if conflict is not None:
        problems.append(conflict)
    elif config.checkpoint.resume:
        mismatch = resume_problem(config.run_dir, config.world_size)
        if mismatch is not None:
            problems.append(mismatch)
    try:
        verified_index(shard_store(config.data), config.model.backbone)
    except (OSError, ValueError, ShardStorageError) as error:
        problems.append(f"data.shards_dir: {error}")
    return problems
