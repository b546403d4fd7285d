"""Config section `logging`: console lines, TensorBoard scalars and attention-map images (rank 0)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LoggingConfig:
    """Console and TensorBoard logging (rank 0)."""

    every: int = 10
    """Console line and scalars every this many steps."""
    image_every: int = 500
    """NP attention-map image grid every this many steps."""
    num_images: int = 4
    """Reference images in each attention-map grid."""
    peak_tflops: float | None = None
    """Per-GPU dense bf16 peak (TFLOP/s) for perf/mfu; None: looked up from the device name (H100, A100, ...)."""

    def __post_init__(self) -> None:
        if self.every < 1 or self.image_every < 1 or self.num_images < 1:
            raise ValueError("logging.every, logging.image_every and logging.num_images must be >= 1")
