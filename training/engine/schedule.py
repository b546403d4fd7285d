"""The learning-rate schedule: linear warmup, then cosine annealing with warm restarts between `lr` and `min_lr`."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from training.engine.config import OptimConfig


@dataclass
class WarmupCosineRestarts:
    """Learning-rate multiplier of optimizer step `step` (0-based): linear warmup, then cosine warm restarts.

    Warmup rises linearly so that step `warmup_steps - 1` runs at the peak. Each cycle of `restart_every` steps
    then falls from the peak to `min_ratio` x peak along a half cosine and restarts at the peak. A plain
    dataclass, so `LambdaLR.state_dict()` stores its fields and the schedule resumes from a checkpoint.
    """

    warmup_steps: int
    restart_every: int
    min_ratio: float

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        position = (step - self.warmup_steps) % self.restart_every
        cosine = 0.5 * (1.0 + math.cos(math.pi * position / self.restart_every))
        return self.min_ratio + (1.0 - self.min_ratio) * cosine


def build_scheduler(optimizer: torch.optim.Optimizer, config: OptimConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """`LambdaLR` with `WarmupCosineRestarts` between `config.lr` and `config.min_lr`; stepped once per applied step.

    `LambdaLR` multiplies each parameter group's own initial lr, so a group built at `lr * mult` (the per-group
    multipliers of `training.engine.optimizer`) runs between `lr * mult` and `min_lr * mult`.
    """
    multiplier = WarmupCosineRestarts(config.warmup_steps, config.restart_every, config.min_lr / config.lr)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
