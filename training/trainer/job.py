"""What the training job reads of its config.

The root schema composes every package's section, so it lives in `cluster` (`cluster.root_config.RootConfig`),
above this package. The training job is written against this protocol instead, and hands each component below it
only its own section.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from shards.config import DataConfig
from training.checkpoint.config import CheckpointConfig
from training.engine.config import BatchGeometry, DeepSpeedConfig, OptimConfig
from training.model.config import ModelConfig
from training.monitor.config import LoggingConfig
from training.objectives.config import LossConfig
from training.objectives.pretrain_config import PretrainConfig
from training.trainer.config import TrainConfig
from training.zeroshot.config import MethodsConfig


class TrainJob(Protocol):
    """The sections a training job reads, plus the run's identity and width (from the cluster section)."""

    model: ModelConfig
    data: DataConfig
    loss: LossConfig
    pretrain: PretrainConfig
    methods: MethodsConfig
    optim: OptimConfig
    deepspeed: DeepSpeedConfig
    train: TrainConfig
    checkpoint: CheckpointConfig
    logging: LoggingConfig

    @property
    def world_size(self) -> int:
        """Training ranks."""

    @property
    def use_gpu(self) -> bool:
        """One GPU per rank."""

    @property
    def batch(self) -> BatchGeometry:
        """The global batch split over the ranks."""

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per optimizer step on each rank."""

    @property
    def run_dir(self) -> Path:
        """Where the run's checkpoints, TensorBoard events and metrics live."""
