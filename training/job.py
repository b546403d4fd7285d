"""What the training package reads of a job's config.

The root schema composes every package's section, so it lives in `cluster` (`cluster.root_config.RootConfig`),
above this package; training code is written against this protocol instead and never reaches up to it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from shards.config import DataConfig
from training.checkpoint.config import CheckpointConfig
from training.engine.config import DeepSpeedConfig, OptimConfig
from training.evaluation.config import EvalConfig
from training.model.config import ModelConfig
from training.monitor.config import LoggingConfig
from training.objectives.config import LossConfig
from training.trainer.config import TrainConfig


class JobConfig(Protocol):
    """The sections training reads, plus the run's identity and width (from the cluster section)."""

    model: ModelConfig
    data: DataConfig
    loss: LossConfig
    optim: OptimConfig
    deepspeed: DeepSpeedConfig
    train: TrainConfig
    checkpoint: CheckpointConfig
    logging: LoggingConfig
    eval: EvalConfig

    @property
    def world_size(self) -> int:
        """Training ranks."""

    @property
    def use_gpu(self) -> bool:
        """One GPU per rank."""

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per optimizer step on each rank."""

    @property
    def run_name(self) -> str:
        """The run's name (resubmitting it resumes)."""

    @property
    def run_dir(self) -> Path:
        """Where the run's checkpoints, TensorBoard events and eval results live."""
