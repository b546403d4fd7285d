"""Watch mode: score every complete checkpoint of a run exactly once, surviving restarts.

The watcher polls `<run>/checkpoints` with `complete_checkpoints` (a checkpoint without its COMPLETE marker is
invisible to it), evaluates each new one, and records it in `<run>/eval/watch_state.json` (written atomically after
every evaluation), so a restarted watcher skips what is done. It stops once a checkpoint at or beyond `until_step`
is scored, or the run's final checkpoint (step == train.steps) is. While it runs it holds a lease on the checkpoints it
has yet to score (`training.checkpoint.watch_lease`, renewed from a thread), so the trainer's pruning keeps them.
Each time it releases one, and when it stops, it prunes by the run's own `checkpoint.keep`
(`training.checkpoint.pruning.prune_released`): the trainer prunes only when it saves, so what the lease protected
after the run's last save would otherwise stay on disk for good.

A checkpoint that cannot be read (truncated weights, an unusable config: `CheckpointError`) is recorded as failed,
logged and skipped; the watcher goes on to the next one, and a restarted watcher does not try it again.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from training.checkpoint import layout, lease, pruning, watch_lease
from training.evaluation.runner import CheckpointError

logger = logging.getLogger(__name__)

STATE_FILE = "watch_state.json"
STATE_VERSION = 1


class WatchState:
    """The steps already scored, adopted or given up on (`failed`, `skipped`), persisted as JSON."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.done: dict[int, dict[str, Any]] = {}
        if self.path.is_file():
            try:
                content = json.loads(self.path.read_text())
                self.done = {int(step): record for step, record in content.get("done", {}).items()}
            except (OSError, ValueError, AttributeError) as error:
                raise ValueError(
                    f"watch state {self.path} is unreadable ({error}); move it away to start over"
                ) from error

    def __contains__(self, step: int) -> bool:
        return step in self.done

    def record(self, step: int, **details: Any) -> None:
        """Mark `step` done and persist at once, so a crash right after loses nothing."""
        self.done[step] = {"at": time.strftime("%Y-%m-%dT%H:%M:%S"), **details}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        content = {"version": STATE_VERSION, "done": {str(step): self.done[step] for step in sorted(self.done)}}
        layout.write_atomically(self.path, json.dumps(content, indent=1) + "\n")


class CheckpointWatcher:
    """Polls a run's checkpoints and hands each complete, not yet scored one to `evaluate`.

    Args:
        run_dir: `<storage>/<run>`.
        evaluate: scores one checkpoint directory; its return value goes to `on_result`.
        poll_seconds: pause between scans.
        final_step: the run's last step (train.steps); the watcher stops once it is scored.
        until_step: stop once a checkpoint at or beyond this step is scored.
        on_result: called with (step, result) after each evaluation (the entry script prints the table).
        state_path: defaults to `<run>/eval/watch_state.json`.
        already_scored: says whether a step's result already exists (written before a crash that lost the state
            update, or by a `--checkpoint` run); such a step is recorded as done instead of scored again.
    """

    def __init__(
        self,
        run_dir: str | Path,
        evaluate: Callable[[Path], Any],
        poll_seconds: float,
        final_step: int | None = None,
        until_step: int | None = None,
        on_result: Callable[[int, Any], None] | None = None,
        state_path: str | Path | None = None,
        already_scored: Callable[[int], bool] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        lease_seconds: float = watch_lease.LEASE_SECONDS,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.evaluate = evaluate
        self.poll_seconds = poll_seconds
        self.final_step = final_step
        self.until_step = until_step
        self.on_result = on_result
        self.state = WatchState(state_path or self.run_dir / "eval" / STATE_FILE)
        self.already_scored = already_scored
        self.sleep = sleep
        self.lease_seconds = lease_seconds

    def _renew_lease(self) -> None:
        watch_lease.write_lease(self.run_dir, self.scored_through(), self.lease_seconds)

    def finished(self) -> bool:
        """True once the stop condition is met by a scored checkpoint."""
        stop_at = [step for step in (self.until_step, self.final_step) if step is not None]
        if not stop_at:
            return False
        return any(step >= min(stop_at) for step in self.state.done)

    def scan_once(self) -> list[int]:
        """Evaluate every complete checkpoint not yet done, oldest first.

        Returns:
            The steps evaluated in this scan.
        """
        evaluated = []
        for step, path in layout.complete_checkpoints(self.run_dir):
            if step in self.state:
                continue
            if self.already_scored is not None and self.already_scored(step):
                logger.info("step %d already has a result; recording it as done without scoring it again", step)
                self.state.record(step, checkpoint=str(path), adopted=True)
                continue
            logger.info("evaluating checkpoint %s", path)
            try:
                result = self.evaluate(path)
            except Exception as error:
                # Training prunes old checkpoints; one that vanished mid-evaluation is skipped, not fatal.
                if not path.exists():
                    logger.warning("checkpoint %s was pruned while being evaluated; skipping it", path)
                    self.state.record(step, skipped="pruned during evaluation")
                    self._release()
                    continue
                if not isinstance(error, CheckpointError):
                    raise  # a benchmark or method problem recurs for every checkpoint: the job stops
                # One bad checkpoint must not stop the watch: every later one would go unscored, and a restarted
                # watcher would stop at the same place. Recorded, so nobody tries it again.
                reason = " ".join(str(error).split())
                logger.error("checkpoint %s failed and is skipped (recorded in %s): %s", path, self.state.path, reason)
                self.state.record(step, checkpoint=str(path), failed=reason)
                self._release()
                continue
            self.state.record(step, checkpoint=str(path))
            self._release()
            evaluated.append(step)
            if self.on_result is not None:
                self.on_result(step, result)
            if self.finished():
                break
        return evaluated

    def _release(self) -> None:
        """Release what is now done to pruning (the lease moves past it) and prune it."""
        watch_lease.write_lease(self.run_dir, self.scored_through(), self.lease_seconds)
        pruning.prune_released(self.run_dir)

    def scored_through(self) -> int:
        """The newest step done (scored, adopted or given up on); -1 for none."""
        return max(self.state.done, default=-1)

    def run(self, max_scans: int | None = None) -> list[int]:
        """Poll until the stop condition (or `max_scans` scans); returns the steps evaluated by this watcher."""
        evaluated: list[int] = []
        scans = 0
        self._renew_lease()
        # A stale lease only lets pruning go back to checkpoint.keep, so a failed renewal is just logged.
        try:
            with lease.Renewal(self._renew_lease, self.lease_seconds / 10, name="watch lease"):
                while not self.finished():
                    evaluated += self.scan_once()
                    scans += 1
                    if self.finished() or (max_scans is not None and scans >= max_scans):
                        break
                    self.sleep(self.poll_seconds)
        finally:
            watch_lease.release(self.run_dir)
            pruning.prune_released(self.run_dir)  # the lease is gone: what it still held goes back to checkpoint.keep
        if self.finished():
            logger.info("watch finished: the stop step is scored (done: %s)", sorted(self.state.done))
        return evaluated
