"""A lease on part of a run: a small JSON file that a live process keeps fresh from a thread.

`{"heartbeat": <epoch s>, "lease_seconds": L, "pid", "host", ...}`, replaced atomically. While the heartbeat is
younger than L the holder counts as alive; a holder that dies stops renewing, and once the lease is stale the others
stop honouring it. L is long (minutes) because the file lives on shared storage, where a write can stall for a
while without its writer being gone. Two leases use this: the eval watcher's claim on checkpoints it has yet to
score (`watch_lease`) and the driver's ownership of the run (`owner_lease`).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from training.checkpoint import layout

logger = logging.getLogger(__name__)


def write(path: str | Path, lease_seconds: float, **fields: Any) -> None:
    """Take or renew the lease at `path`, holding `fields` besides the heartbeat and the holder's pid and host."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lease = {"heartbeat": time.time(), "lease_seconds": lease_seconds, "pid": os.getpid(), "host": socket.gethostname()}
    layout.write_atomically(path, json.dumps(lease | fields) + "\n")


def read(path: str | Path) -> dict[str, Any] | None:
    """The lease at `path`, or None when there is none or it is not a lease (a torn or foreign file).

    Raises:
        OSError: the file exists but cannot be read (storage trouble is not an answer either way).
    """
    try:
        lease = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        return None
    if not isinstance(lease, dict) or not isinstance(lease.get("heartbeat"), (int, float)):
        return None
    return lease


def age(lease: dict[str, Any], now: float | None = None) -> float:
    """Seconds since the lease's last heartbeat."""
    return (time.time() if now is None else now) - float(lease["heartbeat"])


def is_fresh(lease: dict[str, Any], now: float | None = None) -> bool:
    """True while the holder has renewed the lease within its `lease_seconds`."""
    try:
        return age(lease, now) < float(lease["lease_seconds"])
    except (KeyError, TypeError, ValueError):
        return False


class Renewal:
    """Calls `renew` every `period` seconds from a daemon thread while the `with` block runs.

    A failed renewal (shared storage hiccup) is logged and retried at the next beat: the lease is long enough to
    outlast a few of them.
    """

    def __init__(self, renew: Callable[[], None], period: float, name: str = "lease renewal") -> None:
        self.renew = renew
        self.period = period
        self.name = name
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            try:
                self.renew()
            except OSError as error:
                logger.warning("could not renew the %s: %s", self.name, error)

    def __enter__(self) -> Renewal:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()
