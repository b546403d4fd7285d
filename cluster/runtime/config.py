"""Config section `cluster`: where and how wide a job runs. Imports no ray, so any package can read it."""

from __future__ import annotations

from dataclasses import dataclass

PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_SPREAD", "STRICT_PACK")
"""Ray's placement-group strategies, which Ray Train applies to the worker group."""


@dataclass
class ClusterConfig:
    """Ray cluster, worker group and shared storage."""

    address: str | None = None
    """Ray address. None: the job's cluster (inside `ray job submit` or with RAY_ADDRESS), else a local head on 127.0.0.1."""
    num_workers: int = 1
    """Training workers (ranks); one per GPU when `use_gpu`."""
    use_gpu: bool = False
    """Give each worker one GPU."""
    cpus_per_worker: float = 1.0
    """CPU cores Ray reserves for each worker (its loader processes run inside this reservation)."""
    storage_path: str = "./runs"
    """Shared storage every node sees (a shared filesystem path); runs land in `<storage_path>/<run_name>/`."""
    run_name: str = "run"
    """Name of the run; resubmitting the same name resumes it."""
    max_failures: int = 0
    """Worker-group failures Ray recovers from (restarting from the latest complete checkpoint); -1 is unlimited."""
    placement_strategy: str = "PACK"
    """How Ray places the workers on nodes: PACK (as few nodes as fit), SPREAD (across nodes when it can),
    STRICT_SPREAD (one worker per node, else no start) or STRICT_PACK (all on one node)."""
    resource_wait_s: float = 600.0
    """Seconds a worker group waits for its resources (at the start, or after a failure for a lost node to come
    back) before the job ends with a message naming what is missing."""

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError("cluster.num_workers must be >= 1")
        if self.cpus_per_worker <= 0:
            raise ValueError("cluster.cpus_per_worker must be positive")
        if not self.run_name or "/" in self.run_name or self.run_name in (".", ".."):
            raise ValueError(f"cluster.run_name={self.run_name!r} must be a plain directory name")
        if self.max_failures < -1:
            raise ValueError("cluster.max_failures must be >= -1")
        if self.placement_strategy not in PLACEMENT_STRATEGIES:
            raise ValueError(f"cluster.placement_strategy must be one of {', '.join(PLACEMENT_STRATEGIES)}")
        if not self.resource_wait_s > 0:
            raise ValueError("cluster.resource_wait_s must be positive")
