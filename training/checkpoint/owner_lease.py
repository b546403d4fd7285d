"""The driver's ownership of a run: workers publish a checkpoint only while the driver that started them lives.

A driver that dies (SIGKILL, a lost head node) leaves workers that Ray has not yet stopped; they would go on
training and publish checkpoints into a run that nobody owns any more, racing the next submission of the same run.
So the driver holds `<run>/owner.json`, a `training.checkpoint.lease` with a random token it hands its workers,
renewed from a thread. Before a checkpoint is published, rank 0 checks that

- the lease still carries its token (a later submission of the run took it over otherwise),
- the owning process still runs, when the worker can see it (same kernel and pid namespace: a local run, or a
  worker on the driver's node): pid plus start time, so a dead driver is noticed at once and a reused pid is not
  mistaken for it,
- and elsewhere, that the heartbeat is younger than the lease (minutes, as shared storage can be slow).

`OwnerGone` is permanent: the job has no driver to report to, so nothing retries it.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

from training.checkpoint import lease
from training.errors import PermanentError

logger = logging.getLogger(__name__)

OWNER_FILE = "owner.json"
LEASE_SECONDS = 120.0
"""How long workers on other nodes trust a driver without a heartbeat; it renews every `LEASE_SECONDS / 10`."""


class OwnerGone(PermanentError):
    """The driver that owns the run is gone or was replaced: this worker must not publish into the run."""


def owner_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / OWNER_FILE


def _pid_namespace() -> str | None:
    """This process's kernel boot and pid namespace: two processes that agree can see each other's pids."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None  # not Linux: fall back to the heartbeat


def _started(pid: int) -> float | None:
    """When process `pid` started, or None when no such process runs (a zombie has ended)."""
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        return process.create_time()
    except psutil.Error:
        return None


def _renew(run_dir: str | Path, token: str, lease_seconds: float) -> None:
    lease.write(
        owner_path(run_dir),
        lease_seconds,
        token=token,
        started=_started(os.getpid()),
        pid_namespace=_pid_namespace(),
    )


@contextmanager
def held(run_dir: str | Path, lease_seconds: float = LEASE_SECONDS) -> Iterator[str]:
    """Own the run while the `with` block runs; yields the token the workers check against.

    A lease of another live driver is taken over with a warning: the newest submission owns the run, and the
    older one's workers stop publishing.
    """
    previous = _read(run_dir)
    if previous is not None and gone_reason(run_dir, previous.get("token", ""), previous) is None:
        logger.warning(
            "taking over run %s from the driver pid %s on %s, whose lease is still fresh",
            run_dir,
            previous.get("pid"),
            previous.get("host"),
        )
    token = secrets.token_hex(8)
    _renew(run_dir, token, lease_seconds)
    lost = False

    def renew_while_ours() -> None:
        """Renew unless a newer submission took the run over: then leave its lease alone for good."""
        nonlocal lost
        if lost:
            return
        current = _read(run_dir)
        if current is not None and current.get("token") != token:
            lost = True
            logger.warning(
                "run %s was taken over by the driver pid %s; no longer renewing", run_dir, current.get("pid")
            )
            return
        _renew(run_dir, token, lease_seconds)

    try:
        with lease.Renewal(renew_while_ours, lease_seconds / 10, name="run owner lease"):
            yield token
    finally:
        current = _read(run_dir)
        if current is not None and current.get("token") == token:
            owner_path(run_dir).unlink(missing_ok=True)


def _read(run_dir: str | Path) -> dict | None:
    try:
        return lease.read(owner_path(run_dir))
    except OSError:
        return None


def gone_reason(run_dir: str | Path, token: str, owner: dict | None = None, now: float | None = None) -> str | None:
    """Why the driver holding `token` no longer owns the run, or None while it does.

    Raises:
        OSError: the lease cannot be read (storage trouble: no answer either way).
    """
    if owner is None:
        owner = lease.read(owner_path(run_dir))
    if owner is None:
        return f"{owner_path(run_dir)} is gone: the driver ended or released the run"
    who = f"driver pid {owner.get('pid')} on {owner.get('host')}"
    if owner.get("token") != token:
        return f"another submission took the run over ({who})"
    started = owner.get("started")
    if owner.get("pid_namespace") is not None and owner.get("pid_namespace") == _pid_namespace() and started:
        running = _started(int(owner["pid"]))
        if running is None or abs(running - float(started)) > 0.5:
            return f"the {who} has exited"
        return None
    if not lease.is_fresh(owner, now):
        return f"the {who} has not renewed its lease for {lease.age(owner, now):.0f} s"
    return None


def check(run_dir: str | Path, token: str) -> None:
    """Raise `OwnerGone` unless the driver holding `token` still owns the run.

    Raises:
        OwnerGone: with the reason, in one line.
        OSError: the lease cannot be read.
    """
    reason = gone_reason(run_dir, token)
    if reason is not None:
        raise OwnerGone(f"not publishing into {run_dir}: {reason}")
