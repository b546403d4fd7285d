"""The chaos benchmark: a training run whose workers are killed at random, against the same run left alone.

Each run is `launch/train.py` in its own session (a private local Ray on 127.0.0.1). While the chaos run trains,
a random Ray Train worker of its own process tree is SIGKILLed every `kill_every` seconds (uniform in 0.5x-1.5x),
counted from the moment the previous kill's progress was regained. Ray restarts the worker group from the latest
complete checkpoint (`cluster.max_failures=-1`). At the end both runs' final weights are compared byte for byte,
and so are their data digests: every rank's sample keys, chained checkpoint by checkpoint, so equal digests mean
the chaos run saw each sample of the uninterrupted run's sequence exactly once, in the same order.

Kills go to pids found in the run's own process tree (psutil), never by name across the machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from training.checkpoint import layout

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKER_TITLE = "ray::RayTrainWorker"
"""Process title of a Ray Train worker actor (Ray sets it as the process's command line)."""


@dataclass
class Restart:
    killed_pid: int
    killed_at_s: float
    """Seconds into the chaos run."""
    step_at_kill: int
    resumed_from: int
    """The checkpoint step the next attempt started from."""
    lost_s: float
    """From the kill until the restarted group logged a step past `step_at_kill`."""


@dataclass
class RunOutcome:
    run_dir: str
    wall_s: float
    exit_code: int
    steps: int = 0
    samples_seen: int = 0
    data_digest: str = ""
    weights_sha256: str = ""
    restarts: list[Restart] = field(default_factory=list)


def logged_steps(run_dir: Path) -> tuple[int, list[dict]]:
    """(highest step in metrics.jsonl, its start events); torn or half-written lines are skipped."""
    path = run_dir / "metrics.jsonl"
    step, starts = 0, []
    if not path.is_file():
        return step, starts
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("event") == "start":
            starts.append(record)
        elif isinstance(record.get("step"), int):
            step = max(step, record["step"])
    return step, starts


def train_workers(root_pid: int) -> list[psutil.Process]:
    """The Ray Train worker processes under `root_pid`."""
    try:
        tree = psutil.Process(root_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    workers = []
    for process in tree:
        try:
            if " ".join(process.cmdline()).startswith(WORKER_TITLE):
                workers.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return workers


def _stop_tree(process: subprocess.Popen) -> None:
    """Stop a run that is still going: its session first, then any descendant that left it."""
    if process.poll() is not None:
        return
    try:
        descendants = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=20)
            break
        except subprocess.TimeoutExpired:
            continue
    for child in descendants:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


def run(
    command: list[str], run_dir: Path, log: Path, kill_every: float = 0.0, seed: int = 0, progress=None
) -> RunOutcome:
    """Run `command` to its end; with `kill_every > 0`, SIGKILL a random train worker on that schedule."""
    rng = random.Random(seed)
    restarts: list[Restart] = []
    started = time.monotonic()
    next_kill = started + kill_every * rng.uniform(0.5, 1.5) if kill_every else float("inf")
    pending: dict | None = None  # a kill whose progress is not regained yet
    with open(log, "w") as output:
        process = subprocess.Popen(
            command, stdout=output, stderr=subprocess.STDOUT, cwd=REPO_ROOT, start_new_session=True
        )
    try:
        while process.poll() is None:
            time.sleep(0.5)
            now = time.monotonic()
            step, starts = logged_steps(run_dir)
            if progress is not None:
                progress(step, len(restarts) + (pending is not None))
            if pending is not None and len(starts) > pending["starts"] and step > pending["step"]:
                restarts.append(
                    Restart(
                        pending["pid"],
                        round(pending["time"] - started, 1),
                        pending["step"],
                        int(starts[-1]["from_step"]),
                        round(now - pending["time"], 1),
                    )
                )
                pending, next_kill = None, now + kill_every * rng.uniform(0.5, 1.5)
            if pending is None and now >= next_kill and step > 0:
                workers = train_workers(process.pid)
                if workers:
                    victim = rng.choice(workers)
                    victim.send_signal(signal.SIGKILL)
                    pending = {"pid": victim.pid, "time": now, "step": step, "starts": len(starts)}
    finally:
        _stop_tree(process)
    outcome = RunOutcome(str(run_dir), round(time.monotonic() - started, 1), process.returncode, restarts=restarts)
    return final_state(outcome, run_dir)


def final_state(outcome: RunOutcome, run_dir: Path) -> RunOutcome:
    latest = layout.latest_complete(run_dir)
    if latest is not None:
        state_file, weights = latest[1] / layout.TRAINER_STATE, latest[1] / layout.WEIGHTS
        train = json.loads(state_file.read_text())["train"]
        outcome.steps, outcome.samples_seen = int(train["step"]), int(train["samples_seen"])
        outcome.data_digest = train["data_digest"]
        outcome.weights_sha256 = hashlib.sha256(weights.read_bytes()).hexdigest()
    return outcome


def report(reference: RunOutcome, chaos: RunOutcome) -> dict:
    """The benchmark's verdict and figures, JSON-ready."""
    same_weights = bool(reference.weights_sha256) and reference.weights_sha256 == chaos.weights_sha256
    same_data = bool(reference.data_digest) and reference.data_digest == chaos.data_digest
    lost = [restart.lost_s for restart in chaos.restarts]
    return {
        "weights_bitwise_equal": same_weights,
        "samples_each_once_in_order": same_data and reference.samples_seen == chaos.samples_seen,
        "restarts": len(chaos.restarts),
        "time_lost_s": {"total": round(sum(lost), 1), "each": lost},
        "reference": asdict(reference),
        "chaos": asdict(chaos),
    }
