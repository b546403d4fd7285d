"""Stops a driver's private local Ray once the driver is gone, however it ended (SIGKILL included).

`cluster.runtime.ray_setup.connect` starts Ray's processes (GCS, raylet, dashboard, log monitor) as children of the driver;
the raylet starts the agents and the workers. When the driver is SIGKILLed nothing shuts them down: the workers
went on training and the dashboard and runtime-env agents lived on for up to a minute, re-parented to PID 1.

The driver starts this script in its own session with the pids of the processes `ray.init` started. While the driver
lives it records every process in their trees (workers come and go); once its parent pid changes (the driver is
gone) it sends SIGTERM to every recorded process still running and SIGKILL after a grace period, then exits. It
finds Ray's processes by pid and start time only, never by name, so it never touches another Ray on the machine.
A driver that ends normally writes `ended normally` to this script's stdin at exit (`ray_setup` does): the cleanup
is then routine and says nothing on the console; after a driver that was killed it prints one line.
It imports nothing but psutil, so it starts in a fraction of a second.

    python cluster/runtime/ray_watchdog.py <driver pid> <pid of a process ray.init started> ...
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time

import psutil

logger = logging.getLogger("ray_watchdog")

POLL_SECONDS = 0.2
RECORD_EVERY = 5
"""Polls between two walks of the process trees (a walk reads /proc for every process of the machine)."""
GRACE_SECONDS = 3.0


def record(roots: list[psutil.Process], known: dict[int, psutil.Process]) -> None:
    """Add every running process in the trees under `roots` to `known` (pid -> process)."""
    for root in roots:
        try:
            if root.is_running():
                for process in [root, *root.children(recursive=True)]:
                    known.setdefault(process.pid, process)
        except psutil.Error:
            continue  # it ended between the check and the walk


def stop(known: dict[int, psutil.Process], grace: float = GRACE_SECONDS) -> int:
    """SIGTERM every known process that still runs (psutil refuses a pid reused since), SIGKILL after `grace` s.

    Returns:
        How many processes were still running.
    """
    running = []
    for process in known.values():
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                process.terminate()
                running.append(process)
        except psutil.Error:
            continue
    _, alive = psutil.wait_procs(running, timeout=grace)
    for process in alive:
        try:
            process.kill()
        except psutil.Error:
            continue
    return len(running)


def _driver_said_it_ended_normally() -> bool:
    """What the driver wrote to stdin before it went, read without waiting: a pipe end some other process still
    holds must not keep the cleanup from finishing."""
    try:
        os.set_blocking(sys.stdin.fileno(), False)
        return b"ended normally" in (os.read(sys.stdin.fileno(), 64) or b"")
    except (OSError, ValueError):  # nothing written (BlockingIOError), or no stdin at all
        return False


def watch(driver_pid: int, root_pids: list[int]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C meant for the driver must not stop the cleanup
    roots = []
    for pid in root_pids:
        try:
            roots.append(psutil.Process(pid))
        except psutil.Error:
            continue
    known: dict[int, psutil.Process] = {}
    polls = 0
    while os.getppid() == driver_pid:
        if polls % RECORD_EVERY == 0:
            record(roots, known)
        polls += 1
        time.sleep(POLL_SECONDS)
    record(roots, known)  # the trees of the processes still running (the raylet's workers)
    stopped = stop(known)
    if stopped:
        level = logging.INFO if _driver_said_it_ended_normally() else logging.WARNING
        logger.log(level, "driver %d is gone; stopped %d process(es) of its local Ray", driver_pid, stopped)
    return 0


if __name__ == "__main__":
    logging.basicConfig(format="ray watchdog: %(message)s")
    sys.exit(watch(int(sys.argv[1]), [int(pid) for pid in sys.argv[2:]]))
