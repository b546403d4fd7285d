"""What the driver checks before Ray starts: problems that would recur on every retry of the worker group.

Inside the workers such a problem surfaced only after Ray and DeepSpeed had started, and Ray then retried it
`cluster.max_failures` times. Here it stops the submission at once with one line and exit code 2.
"""

from __future__ import annotations

from pathlib import Path

from cluster.root_config import RootConfig
from shards.storage import ShardStorageError


def startup_problems(config: RootConfig) -> list[str]:
    """Every problem found, each a line naming the key or file and what to do; empty when the job can start."""
    from shards.stream.reader import shard_store, verified_index
    from training.checkpoint import layout
    from training.checkpoint.checkpointer import fresh_start_conflict, resume_problem

    problems = []
    conflict = fresh_start_conflict(config.run_dir, config.checkpoint.resume)
    if conflict is not None:
        problems.append(conflict)
    elif config.checkpoint.resume:
        mismatch = resume_problem(config.run_dir, config.world_size)
        if mismatch is not None:
            problems.append(mismatch)
    fresh = layout.latest_complete(config.run_dir) is None
    for key in ("weights_file", "init_from"):  # every worker reads the first; a fresh run the second
        value = getattr(config.model, key)
        if value and (fresh or key == "weights_file") and not Path(value).is_file():
            hint = " (configs/tiscir_tiny.yaml starts from the msmp stage: train configs/tiscir_msmp_tiny.yaml first)"
            problems.append(f"model.{key}: {value} not found" + (hint if "tiscir_msmp" in value else ""))
    try:
        verified_index(shard_store(config.data), config.model.backbone)
    except (OSError, ValueError, ShardStorageError) as error:
        problems.append(f"data.shards_dir: {error}")
    return problems
