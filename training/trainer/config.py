"""Config section `train`: the run's length, batch geometry and failure policy."""

from __future__ import annotations

from dataclasses import dataclass

from training.engine.config import BatchGeometry

OBJECTIVES = ("context", "towers", "phi", "tiscir")


@dataclass
class TrainConfig:
    """Length, batch geometry and failure policy of a training run."""

    steps: int = 35_000
    """Optimizer steps in the run."""
    global_batch: int = 256
    """Triplets per optimizer step over all ranks: micro_batch x accumulation x num_workers."""
    micro_batch: int = 32
    """Triplets per rank per forward pass."""
    seed: int = 0
    """Seed of model init and per-rank RNG streams."""
    max_consecutive_skips: int = 10
    """Abort after this many non-finite steps in a row."""
    objective: str = "context"
    """What the job trains: `context` (ConText-CIR: contrastive + Text-CC), `towers` (the CLIP-style pretraining
    of the open_clip towers on described images, section `pretrain`), or one of the other methods on frozen towers
    (DESIGN section 13): `phi` (textual inversion, `methods.phi`) or `tiscir` (`methods.tiscir`)."""

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"train.objective={self.objective!r} must be one of {OBJECTIVES}")
        if self.steps < 1 or self.global_batch < 1 or self.micro_batch < 1:
            raise ValueError("train.steps, train.global_batch and train.micro_batch must be >= 1")
        if self.max_consecutive_skips < 1:
            raise ValueError("train.max_consecutive_skips must be >= 1")

    def geometry(self, world_size: int) -> BatchGeometry:
        """This run's batch split over `world_size` ranks.

        Raises:
            ValueError: the global batch does not split into micro-batch x accumulation x world size.
        """
        return BatchGeometry(self.global_batch, self.micro_batch, world_size)
