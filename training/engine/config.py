"""Config sections `optim` (AdamW and its schedule) and `deepspeed` (the engine around them)."""

from __future__ import annotations

from dataclasses import dataclass

PRECISIONS = ("auto", "bf16", "fp32")
REDUCE_DTYPES = ("fp32", "bf16")


@dataclass(frozen=True)
class BatchGeometry:
    """How one optimizer step's global batch splits over ranks and micro-batches."""

    global_batch: int
    """Triplets per optimizer step over all ranks."""
    micro_batch: int
    """Triplets per rank per forward pass."""
    world_size: int
    """Data-parallel ranks."""

    def __post_init__(self) -> None:
        per_pass = self.micro_batch * self.world_size
        if self.global_batch % per_pass:
            raise ValueError(
                f"train.global_batch={self.global_batch} is not divisible by train.micro_batch ({self.micro_batch}) "
                f"x world size ({self.world_size} ranks, cluster.num_workers) = {per_pass}"
            )

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per optimizer step on each rank."""
        return self.global_batch // (self.micro_batch * self.world_size)


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine annealing with warm restarts between `lr` and `min_lr`."""

    lr: float = 2e-5
    """Peak learning rate."""
    min_lr: float = 2e-7
    """Floor of each cosine cycle."""
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-8
    weight_decay: float = 1e-2
    """Decoupled weight decay; norms, biases, embeddings and the pooler seed get none."""
    warmup_steps: int = 500
    """Optimizer steps of linear warmup from 0 to `lr`."""
    restart_every: int = 5000
    """Optimizer steps per cosine cycle after warmup; each cycle restarts at `lr`."""
    tower_lr_mult: float = 1.0
    """Multiplier of `lr` and `min_lr` for the image and text towers' parameters (the schedule scales the result)."""
    head_lr_mult: float = 1.0
    """Multiplier of `lr` and `min_lr` for every parameter outside the towers: fusion head, pooler, projection and
    a learned temperature. The logged `lr` is the first group's, this one whenever the head trains."""

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"optim.min_lr ({self.min_lr}) must be in [0, optim.lr ({self.lr})] and lr positive")
        if self.warmup_steps < 0 or self.restart_every < 1:
            raise ValueError("optim.warmup_steps must be >= 0 and optim.restart_every >= 1")
        for key in ("tower_lr_mult", "head_lr_mult"):
            if not getattr(self, key) > 0:
                raise ValueError(f"optim.{key}={getattr(self, key)} must be positive (model.freeze fixes a tower)")


@dataclass
class DeepSpeedConfig:
    """The DeepSpeed engine. Batch sizes come from `train`; the rest is translated to DeepSpeed's JSON."""

    zero_stage: int = 0
    """ZeRO stage 0-3."""
    precision: str = "auto"
    """`auto` (bf16 on GPU, fp32 on CPU), `bf16` or `fp32`."""
    gradient_clipping: float = 1.0
    """Global gradient-norm clip."""
    offload_optimizer: bool = False
    """ZeRO optimizer state offload to CPU (stage >= 1)."""
    reduce_dtype: str = "fp32"
    """dtype gradients are all-reduced in: `fp32` (exact sums, the default) or `bf16` (half the traffic)."""
    overlap_comm: bool = True
    """Overlap gradient reduction with the backward pass."""
    reduce_bucket_size: int = 50_000_000
    """Elements per gradient-reduction bucket (ZeRO >= 1). With overlap_comm ZeRO holds ~4.5 buckets: 50M fp32
    elements cost ~0.9 GB per GPU, enough to overlap a ~1B-parameter model's reduction."""
    allgather_bucket_size: int = 50_000_000
    """Elements per parameter all-gather bucket (ZeRO >= 1)."""

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"deepspeed.zero_stage={self.zero_stage} must be 0, 1, 2 or 3")
        if self.precision not in PRECISIONS:
            raise ValueError(f"deepspeed.precision={self.precision!r} must be one of {PRECISIONS}")
        if self.reduce_dtype not in REDUCE_DTYPES:
            raise ValueError(f"deepspeed.reduce_dtype={self.reduce_dtype!r} must be one of {REDUCE_DTYPES}")
        if self.reduce_bucket_size < 1 or self.allgather_bucket_size < 1:
            raise ValueError("deepspeed.reduce_bucket_size and deepspeed.allgather_bucket_size must be >= 1")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("deepspeed.offload_optimizer needs deepspeed.zero_stage >= 1")
