"""Connecting the driver to Ray: the job's cluster when there is one, else a private local head on 127.0.0.1.

- Inside `ray job submit` Ray sets `RAY_ADDRESS` for the entrypoint; `cluster.address` or a user-set
  `RAY_ADDRESS` name a running cluster. The job's runtime env (`--working-dir .`) already lets the workers
  import this repository.
- Otherwise a local Ray starts inside this process, bound to 127.0.0.1 (its dashboard too), and its workers get the
  repository on PYTHONPATH. It ends with the driver, also when the driver is killed: a watchdog process
  (`cluster/runtime/ray_watchdog.py`) stops Ray's processes once the driver is gone. Unless `RAY_AUTH_MODE` says otherwise
  it uses token authentication with a token that lives only in this process's environment: Ray's own default
  would write `~/.ray/auth_token`, which then silently switches every later `ray start` on the machine to token
  auth.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import secrets
import socket
import subprocess
import sys
from pathlib import Path

from cluster.runtime.config import ClusterConfig
from shards.storage import is_url

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
LOOPBACK = "127.0.0.1"
GCS_PORT_VARIABLE = "RAY_GCS_SERVER_PORT"
"""Ray reads the port of a GCS it starts from here (ray._private.node)."""


def cluster_address(cluster: ClusterConfig) -> str | None:
    """The address of a running cluster to join, or None to start a local one."""
    return cluster.address or os.environ.get("RAY_ADDRESS") or None


def relative_path_problem(cluster: ClusterConfig, paths: dict[str, str]) -> str | None:
    """Why relative paths cannot work for this job, or None.

    Under `ray job submit --working-dir .` the entrypoint runs in Ray's unpacked copy of the working directory
    (without git-ignored data), and workers on other nodes have their own filesystems: a relative storage path
    would put checkpoints in a temporary directory that disappears with the job.
    """
    if cluster_address(cluster) is None:
        return None
    relative = [
        f"{key}={value}"
        for key, value in paths.items()
        if value and not is_url(value) and not Path(value).is_absolute()
    ]
    if not relative:
        return None
    return (
        f"{', '.join(relative)}: joining a Ray cluster needs absolute paths on storage every node mounts "
        "(a relative path would resolve inside the job's temporary copy of the working directory)"
    )


def connect(cluster: ClusterConfig) -> str:
    """Initialise Ray in this driver process (idempotent).

    Call it before anything imports `ray`: Ray reads its authentication settings once, at import.

    Returns:
        A description of what was joined or started, for the console.
    """
    address = cluster_address(cluster)
    # Ray Data jobs (indexing, generation) draw one tqdm bar of their own; Ray Data's console lines (its progress
    # notice, "execution finished") are read at its import from this variable, which a user may still set.
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "ERROR")
    if address is None:
        # Never expose a cluster on the network by accident: every listener of a local head stays on loopback.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        unset = "RAY_AUTH_MODE" not in os.environ and not os.environ.get("RAY_AUTH_TOKEN")
        if unset and "ray" not in sys.modules:
            os.environ["RAY_AUTH_MODE"] = "token"
            os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)  # inherited by the processes Ray starts, not on disk
    import ray

    if ray.is_initialized():
        return "ray already initialised in this process"
    if address is not None:
        # Workers' output is not streamed to this console: training ranks write <run>/logs/, the rest stays in
        # Ray's own session logs. The console keeps the driver's progress and results.
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        return f"joined the Ray cluster at {address}"
    needed = math.ceil(cluster.num_workers * cluster.cpus_per_worker)
    python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    children_before = _child_pids()
    # Ray's own actors (Ray Train's placement-group cleaner) find "their" cluster through the State API, which
    # without RAY_ADDRESS looks for GCS processes on the machine and fails with a traceback as soon as a second
    # Ray runs there (another private head, a `ray start`). So the GCS gets a port chosen here, and every process
    # of this Ray is told it.
    gcs_port = _free_port()
    previous_port = os.environ.get(GCS_PORT_VARIABLE)
    os.environ[GCS_PORT_VARIABLE] = str(gcs_port)  # read by ray.init when it starts the GCS
    try:
        ray.init(
            # "local": always a new private instance. Without it ray.init joins the Ray that RAY_ADDRESS or the
            # machine's last `ray start` (/tmp/ray/ray_current_cluster, left behind by a head that was killed)
            # names, and fails there because this call sets num_cpus.
            address="local",
            _node_ip_address=LOOPBACK,
            # The dashboard serves Ray's State API, which Ray Train polls to watch its controller (without it every
            # poll logs a warning). Loopback only, behind the token; a free port, so private heads never collide.
            include_dashboard=True,
            dashboard_host=LOOPBACK,
            dashboard_port=_free_port(),
            num_cpus=max(os.cpu_count() or 1, needed),
            num_gpus=None if cluster.use_gpu else 0,
            runtime_env={"env_vars": {"PYTHONPATH": python_path, "RAY_ADDRESS": f"{LOOPBACK}:{gcs_port}"}},
            logging_level=logging.WARNING,
            log_to_driver=False,  # as above: workers write <run>/logs/ and Ray's session logs
        )
    finally:
        if previous_port is None:
            os.environ.pop(GCS_PORT_VARIABLE, None)
        else:
            os.environ[GCS_PORT_VARIABLE] = previous_port
    _start_watchdog(sorted(_child_pids() - children_before))
    return f"started a local Ray on {LOOPBACK} (stops when this process ends)"


def _child_pids() -> set[int]:
    import psutil

    return {child.pid for child in psutil.Process().children()}


_watchdog: subprocess.Popen | None = None


def _start_watchdog(ray_pids: list[int]) -> None:
    """Start the process that stops the private Ray (the trees under `ray_pids`) once this driver is gone.

    In its own session, so that a Ctrl-C or a signal to the driver's process group does not stop it before the
    cleanup. It exits by itself after the driver.
    """
    global _watchdog
    script = Path(__file__).with_name("ray_watchdog.py")
    command = [sys.executable, str(script), str(os.getpid()), *map(str, ray_pids)]
    _watchdog = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True)
    atexit.register(_tell_watchdog_the_driver_ended_normally)


def _tell_watchdog_the_driver_ended_normally() -> None:
    """At a normal exit the watchdog's cleanup is routine and stays silent (a killed driver never gets here)."""
    if _watchdog is not None and _watchdog.stdin is not None:
        try:
            _watchdog.stdin.write(b"ended normally\n")
            _watchdog.stdin.flush()
        except OSError:  # the watchdog is gone already
            pass


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


def shutdown() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def cluster_has_gpus() -> bool:
    """Whether the connected Ray cluster has a GPU anywhere (call after `connect`)."""
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def quiet_ray_data(preserve_order: bool = False) -> None:
    """Ray Data without its own progress output, for jobs that draw one tqdm bar of their own.

    Ray Data's per-dataset progress bars and "execution started" lines would interleave with that bar; its logger is
    kept to errors. `preserve_order`: the blocks come out in input order (an index keeps its rows in order).
    """
    import ray

    logging.getLogger("ray.data").setLevel(logging.ERROR)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    if preserve_order:
        context.execution_options.preserve_order = True
