"""The driver's progress bar for a training job: one line, fed by the run's `metrics.jsonl`.

Rank 0 appends a record per step to `<run>/metrics.jsonl` on the shared storage; the driver follows that file
from a thread and shows step / total, loss, triplets/s and the ETA. A restarted attempt (Ray retrying the worker
group) rewrites the file from its checkpoint and logs a start event; the bar goes back to that step.
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path
from typing import Any

from tqdm import tqdm

from training.monitor.run_monitor import METRICS_FILE


class MetricsProgress:
    """`with MetricsProgress(run_dir, total_steps, global_batch): trainer.fit()`.

    Args:
        run_dir: the run directory rank 0 writes `metrics.jsonl` into.
        total_steps: `train.steps`.
        global_batch: triplets per step, for the throughput.
        poll_seconds: how often the file is read.
        file: where the bar goes (stderr); on a non-terminal it redraws only every 30 s.
    """

    def __init__(
        self, run_dir: str | Path, total_steps: int, global_batch: int, poll_seconds: float = 1.0, file=None
    ) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        self.total_steps = total_steps
        self.global_batch = global_batch
        self.poll_seconds = poll_seconds
        self.file = file if file is not None else sys.stderr
        self.restarts = 0
        self._starts_before = 0  # start events of earlier submissions of this run
        self._starts = 0  # start events read in this pass over the file
        self._inode: int | None = None
        self._offset = 0
        self._partial = b""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.bar: tqdm | None = None

    def __enter__(self) -> MetricsProgress:
        if self.path.is_file():  # an earlier submission's records: counted, not shown
            content = self.path.read_bytes()
            self._starts_before = sum(_is_start(line) for line in content.split(b"\n"))
            self._inode, self._offset = self.path.stat().st_ino, len(content)
        terminal = getattr(self.file, "isatty", lambda: False)()
        self.bar = tqdm(
            total=self.total_steps,
            desc="training",
            unit="step",
            file=self.file,
            dynamic_ncols=terminal,
            mininterval=0.5 if terminal else 30.0,
        )
        self._thread = threading.Thread(target=self._follow, name="metrics-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.poll()  # the last records
        if self.bar is not None:
            self.bar.close()

    def _follow(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.poll()
            except OSError:  # a storage hiccup: the next poll retries
                continue

    def poll(self) -> None:
        """Read what rank 0 appended since the last poll (from the start when the file was rewritten)."""
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return
        if stat.st_ino != self._inode or stat.st_size < self._offset:  # rewritten by a restart: read it again
            self._inode, self._offset, self._partial, self._starts = stat.st_ino, 0, b"", 0
        if stat.st_size == self._offset:
            return
        with self.path.open("rb") as metrics:
            metrics.seek(self._offset)
            chunk = metrics.read()
            self._offset = metrics.tell()
        *lines, self._partial = (self._partial + chunk).split(b"\n")  # an unfinished last line waits
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                self._show(record)

    def _show(self, record: dict[str, Any]) -> None:
        bar = self.bar
        if bar is None:
            return
        if record.get("event") == "start":
            self._starts += 1
            start = int(record.get("from_step", 0))
            # This submission's first attempt logs one start event; each later one is Ray restarting the group.
            self.restarts = max(self.restarts, self._starts - self._starts_before - 1)
            bar.reset(total=self.total_steps)
            bar.update(start)
            if self.restarts:
                bar.set_description(f"training (restart {self.restarts} from step {start})")
            return
        step = record.get("step")
        if not isinstance(step, int) or step <= bar.n:
            return
        bar.update(step - bar.n)
        loss, seconds = record.get("loss"), record.get("step_time_s")
        postfix = {}
        if isinstance(loss, int | float):
            postfix["loss"] = f"{loss:.4f}"
        if isinstance(seconds, int | float) and seconds > 0:
            postfix["triplets/s"] = f"{self.global_batch / seconds:.1f}"
        bar.set_postfix(postfix, refresh=False)


def _is_start(line: bytes) -> bool:
    try:
        record = json.loads(line)
    except ValueError:
        return False
    return isinstance(record, dict) and record.get("event") == "start"
