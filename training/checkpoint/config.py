"""Config section `checkpoint`: how often, how many, and whether a run resumes."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CheckpointConfig:
    """Checkpoints under `<storage>/<run>/checkpoints/step_XXXXXXXX/`."""

    every_steps: int = 1000
    """Save every this many optimizer steps (and always at the end)."""
    keep: int = 3
    """Complete checkpoints kept; older ones are pruned."""
    resume: bool = True
    """Continue from the run's latest complete checkpoint when there is one; false starts fresh and refuses to
    start (exit 2) when the run already has checkpoints, so nothing is clobbered: pick a new `cluster.run_name`."""

    def __post_init__(self) -> None:
        if self.every_steps < 1 or self.keep < 1:
            raise ValueError("checkpoint.every_steps and checkpoint.keep must be >= 1")
