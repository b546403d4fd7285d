"""The driver's progress bar follows metrics.jsonl as rank 0 writes it, through a restart that rewrites it."""

from __future__ import annotations

import io
import json

from cluster.runtime.progress import MetricsProgress
from training.monitor.run_monitor import METRICS_FILE, drop_steps_after


def _append(path, *records) -> None:
    with path.open("a") as metrics:
        for record in records:
            metrics.write(json.dumps(record) + "\n")


def test_progress_follows_steps_a_torn_line_and_a_restart(tmp_path):
    path = tmp_path / METRICS_FILE
    output = io.StringIO()
    with MetricsProgress(tmp_path, total_steps=6, global_batch=64, poll_seconds=60, file=output) as progress:
        progress.poll()  # no file yet
        assert progress.bar.n == 0
        _append(
            path, {"event": "start", "from_step": 0}, *({"step": s, "loss": 1.0, "step_time_s": 0.5} for s in (1, 2))
        )
        with path.open("a") as metrics:
            metrics.write('{"step": 3, "loss": 0.9, "step_')  # rank 0 is mid-write
        progress.poll()
        assert progress.bar.n == 2 and progress.bar.postfix == "loss=1.0000, triplets/s=128.0"
        with path.open("a") as metrics:
            metrics.write('time_s": 0.25}\n')
        progress.poll()
        assert progress.bar.n == 3 and "triplets/s=256.0" in progress.bar.postfix
        _append(path, {"step": 4, "loss": 0.8, "step_time_s": 0.5})
        progress.poll()
        # The worker group dies; Ray restarts it from the step-2 checkpoint, which rewrites the file.
        drop_steps_after(path, 2)
        _append(path, {"event": "start", "from_step": 2})
        progress.poll()
        assert progress.bar.n == 2 and progress.restarts == 1
        _append(path, *({"step": s, "loss": 0.5, "step_time_s": 0.5} for s in (3, 4, 5, 6)))
    assert progress.bar.n == 6 and progress.restarts == 1
    assert "6/6" in output.getvalue() and "restart 1 from step 2" in output.getvalue()


def test_a_resumed_submission_starts_the_bar_at_its_checkpoint(tmp_path):
    """An earlier submission's records are not this one's: no restart is counted for them."""
    _append(tmp_path / METRICS_FILE, {"event": "start", "from_step": 0}, {"step": 1}, {"step": 2})
    with MetricsProgress(tmp_path, total_steps=4, global_batch=8, poll_seconds=60, file=io.StringIO()) as progress:
        _append(tmp_path / METRICS_FILE, {"event": "start", "from_step": 2}, {"step": 3})
        progress.poll()
        assert progress.bar.n == 3 and progress.restarts == 0
