"""Where the workers run and how long a job waits for them: placement, the resource wait, and a record of nodes.

- **Placement.** `cluster.placement_strategy` is the strategy of the placement group Ray Train reserves for the
  worker group: PACK (Ray's default: as few nodes as fit), SPREAD (across nodes when it can), STRICT_SPREAD (one
  worker per node, or no start) and STRICT_PACK (all on one node).
- **The resource wait.** Ray Train 2.60 waits `RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S` (60 s by default) for the
  placement group, then counts a "controller failure" and tries again; with the default unlimited
  `controller_failure_limit` a job whose node died and never came back waits forever. We use Ray's own mechanism:
  the timeout is `cluster.resource_wait_s`, and the trainer allows no controller failure, so a worker group that
  cannot start within the wait ends the job. `resource_wait` turns Ray's error into one line that says what was
  waited for, for how long, and which resources are missing.
- **Which node each rank ran on** goes to `<run>/placement.jsonl`, one line per rank and attempt, because the
  workers' own records (`metrics.jsonl`) name a host, and nodes sharing a host (or an IP) are told apart only by
  Ray's node id.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from cluster.runtime.config import ClusterConfig

logger = logging.getLogger(__name__)

START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
"""Ray Train's wait for the worker group's placement group; the driver passes it on to the controller."""
PLACEMENT_FILE = "placement.jsonl"
RESOURCE_WAIT_EXIT = 3
"""Exit code of a job that ended because its workers' resources did not appear within `cluster.resource_wait_s`."""


class ResourceWaitExpired(RuntimeError):
    """The worker group could not get its resources within `cluster.resource_wait_s`; the message is one line."""


def worker_resources(cluster: ClusterConfig) -> dict[str, float]:
    """What Ray reserves for each worker (the placement group's bundle)."""
    return {"CPU": cluster.cpus_per_worker} | ({"GPU": 1.0} if cluster.use_gpu else {})


def workers_that_fit(nodes: Sequence[Mapping[str, float]], bundle: Mapping[str, float], strategy: str) -> int:
    """How many workers needing `bundle` the nodes (their resources) can hold under a placement strategy."""
    per_node = [
        min(math.floor(node.get(name, 0.0) / amount + 1e-9) for name, amount in bundle.items()) for node in nodes
    ]
    if strategy == "STRICT_SPREAD":
        return sum(1 for count in per_node if count >= 1)  # one worker per node at most
    if strategy == "STRICT_PACK":
        return max(per_node, default=0)  # every worker on one node
    return sum(per_node)


def shortage(nodes: Sequence[Mapping[str, float]], cluster: ClusterConfig) -> str:
    """Which resources the alive nodes (their total resources) lack for the worker group, in words."""
    bundle = worker_resources(cluster)
    fit = workers_that_fit(nodes, bundle, cluster.placement_strategy)
    if fit >= cluster.num_workers:
        return f"the {len(nodes)} alive node(s) could hold every worker (their resources are busy with other work)"
    missing = cluster.num_workers - fit
    where = "more node(s), each with" if cluster.placement_strategy == "STRICT_SPREAD" else "more worker slot(s) of"
    return (
        f"{len(nodes)} alive node(s) hold {fit} of {cluster.num_workers} workers; missing: {missing} {where} {bundle}"
    )


def alive_node_resources() -> list[dict[str, float]]:
    """Total resources of each alive node of the connected cluster."""
    import ray

    return [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]


def _is_start_timeout(error: BaseException) -> bool:
    from ray.train import ControllerError
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError  # Ray has no public name for it

    return isinstance(error, ControllerError) and isinstance(error.controller_failure, WorkerGroupStartupTimeoutError)


@contextmanager
def resource_wait(cluster: ClusterConfig) -> Iterator[None]:
    """Run `trainer.fit()` inside: Ray Train waits `cluster.resource_wait_s` for its workers, then the job ends.

    Raises:
        ResourceWaitExpired: the placement group was not ready within the wait (at the start or after a restart).
    """
    previous = os.environ.get(START_TIMEOUT_ENV)
    os.environ[START_TIMEOUT_ENV] = str(cluster.resource_wait_s)  # read by Ray when fit() starts its controller
    try:
        yield
    except Exception as error:
        if not _is_start_timeout(error):
            raise
        try:
            nodes = alive_node_resources()
        except Exception as state_error:  # the message must not depend on a second call into a failing cluster
            missing = f"(could not read the cluster's nodes: {state_error})"
        else:
            missing = shortage(nodes, cluster)
        raise ResourceWaitExpired(
            f"waited {cluster.resource_wait_s:g} s for {cluster.num_workers} worker(s) x {worker_resources(cluster)} "
            f"placed {cluster.placement_strategy}; {missing}. Add the nodes or raise "
            "cluster.resource_wait_s, then resubmit: the run resumes from its latest complete checkpoint"
        ) from error
    finally:
        if previous is None:
            os.environ.pop(START_TIMEOUT_ENV, None)
        else:
            os.environ[START_TIMEOUT_ENV] = previous


def record_placement(run_dir: str | Path, rank: int) -> None:
    """Append this worker's rank, Ray node id and pid to `<run>/placement.jsonl` (one small append per rank)."""
    import ray

    context = ray.get_runtime_context()
    record = {"rank": rank, "node_id": context.get_node_id(), "pid": os.getpid(), "time": time.time()}
    path = Path(run_dir) / PLACEMENT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as placement:  # one write of one short line: appends of concurrent ranks do not interleave
        placement.write(json.dumps(record) + "\n")


def read_placement(run_dir: str | Path) -> list[dict]:
    """Every record of `<run>/placement.jsonl`, in the order written."""
    path = Path(run_dir) / PLACEMENT_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
