"""The JSON report of `launch/bench.py gpu`, rewritten (atomically) the moment each figure exists.

A run cut short by its time limit, or killed, still leaves every figure it measured, and says what is missing:

    {"dry_run": ..., "device": ..., "budget_s": ..., "preflight": {...}, "labels": {figure: what it includes},
     "sections": {name: {"status": ..., "figures": {...}, ...}, ...}, "seconds": ..., "finished": ...}

Sections keep the order they were declared in (the most valuable first). A section's `status` is
`not reached` (never started: the run ended first, or `reason` says the budget left too little), `started, not
finished` (cut short while it ran: its figures so far are kept), `done`, or `failed` (`error` says why; the run
goes on with the next section).
"""

from __future__ import annotations

import json
import os
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

NOT_REACHED = "not reached"
RUNNING = "started, not finished"
DONE = "done"
FAILED = "failed"


class BenchReport:
    """The report file and its in-memory copy; every change is written through at once."""

    def __init__(self, path: Path, header: dict[str, Any], sections: dict[str, dict[str, Any]]) -> None:
        """
        Args:
            path: the JSON file (its directory is created).
            header: device, versions, budget and the like.
            sections: name -> fixed facts of the section (what it measures), in the order they run.
        """
        self.path = path
        self.started = time.perf_counter()
        self.document: dict[str, Any] = {
            **header,
            "sections": {name: {"status": NOT_REACHED, **facts, "figures": {}} for name, facts in sections.items()},
            "seconds": 0.0,
            "finished": False,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        self.write()

    def write(self) -> None:
        """Replace the file in one rename: a reader (or a kill) never meets half a JSON document."""
        self.document["seconds"] = round(time.perf_counter() - self.started, 1)
        partial = self.path.with_name(f".{self.path.name}.{os.getpid()}.partial")
        partial.write_text(json.dumps(self.document, indent=1) + "\n")
        os.replace(partial, self.path)

    def put(self, key: str, value: Any) -> None:
        """A top-level entry (preflight figures, labels)."""
        self.document[key] = value
        self.write()

    def section(self, name: str) -> dict[str, Any]:
        return self.document["sections"][name]

    def figure(self, section: str, name: str, value: Any) -> None:
        """One figure of a section, written at once."""
        self.section(section)["figures"][name] = value
        self.write()

    def recorder(self, section: str) -> Callable[[str, Any], None]:
        """`record(name, value)` for the measuring code of one section."""
        return lambda name, value: self.figure(section, name, value)

    def skip(self, section: str, reason: str) -> None:
        """Leave a section not reached, saying why."""
        self.section(section)["reason"] = reason
        self.write()

    @contextmanager
    def running(self, section: str, **facts: Any) -> Iterator[dict[str, Any]]:
        """Mark the section started while its body runs; done or failed after (a failure does not propagate)."""
        entry = self.section(section)
        entry.update(status=RUNNING, **facts)
        self.write()
        started = time.perf_counter()
        try:
            yield entry
            entry["status"] = DONE
        except Exception as error:  # a failed section must not cost the others' figures
            entry["status"] = FAILED
            entry["error"] = "".join(traceback.format_exception_only(error)).strip()[-2000:]
            entry["traceback"] = traceback.format_exc()[-4000:]
        finally:
            entry["seconds"] = round(time.perf_counter() - started, 1)
            self.write()

    def finish(self) -> None:
        self.document["finished"] = True
        self.write()

    def failed_sections(self) -> list[str]:
        return [name for name, entry in self.document["sections"].items() if entry["status"] == FAILED]
