"""What a finished or interrupted run left on disk, read the way the end-to-end tests compare runs.

A resumed run must match an uninterrupted one: the same per-step loss, sample digest and learning rate
(`trajectory`), the same combined sample digest of every rank (`data_digest`), and start events that say where
each attempt began (`starts`).
"""

from __future__ import annotations

import json
from pathlib import Path

from training.checkpoint import layout
from training.monitor.run_monitor import read_metrics


def trajectory(run_dir: Path) -> list[tuple]:
    """(step, loss, rank 0's sample digest, lr) of every logged step, in step order."""
    records = read_metrics(run_dir)
    return [(step, records[step]["loss"], records[step]["digest"], records[step]["lr"]) for step in sorted(records)]


def start_events(run_dir: Path) -> list[dict]:
    """The `start` events of `metrics.jsonl`: one per attempt of rank 0, with its pid and first step."""
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [record for record in map(json.loads, lines) if record.get("event") == "start"]


def starts(run_dir: Path) -> list[int]:
    """The step each attempt started from (0 for a fresh run)."""
    return [record["from_step"] for record in start_events(run_dir)]


def data_digest(run_dir: Path, step: int | None = None) -> str:
    """Every rank's sample keys up to checkpoint `step` (default: the latest complete one), combined.

    Rank 0's alone are in the trajectory.
    """
    if step is None:
        step = layout.latest_complete(run_dir)[0]
    state = json.loads((layout.checkpoint_dir(run_dir, step) / layout.TRAINER_STATE).read_text())
    return state["train"]["data_digest"]
