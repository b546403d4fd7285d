"""The eval watcher's claim on a run's checkpoints: the trainer does not prune what the watcher has yet to score.

A watching eval job keeps `<run>/eval/watch_lease.json` fresh, `{"heartbeat": <epoch s>, "lease_seconds": L,
"through": <newest step scored, -1 for none>, "pid", "host"}`. While the heartbeat is younger than L, pruning keeps
every complete checkpoint after `through` (the watcher scores oldest first), so a watcher slower than the trainer
still scores every checkpoint. A watcher that dies stops renewing its lease; once it is stale, pruning goes back to
`checkpoint.keep`. The file is a `training.checkpoint.lease`.
"""

from __future__ import annotations

from pathlib import Path

from training.checkpoint import lease

LEASE_FILE = "watch_lease.json"
LEASE_SECONDS = 300.0
"""How long a lease holds without a heartbeat: a watcher renews it every `LEASE_SECONDS / 10` from a thread."""


def lease_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "eval" / LEASE_FILE


def write_lease(run_dir: str | Path, through: int, lease_seconds: float = LEASE_SECONDS) -> None:
    """Claim (or renew the claim on) every checkpoint after step `through`."""
    lease.write(lease_path(run_dir), lease_seconds, through=through)


def release(run_dir: str | Path) -> None:
    lease_path(run_dir).unlink(missing_ok=True)


def claimed_after(run_dir: str | Path, now: float | None = None) -> int | None:
    """The step after which a live watcher claims every checkpoint, or None (no watcher, a stale or bad lease)."""
    try:
        claim = lease.read(lease_path(run_dir))
        return int(claim["through"]) if claim is not None and lease.is_fresh(claim, now) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None
