"""The root config schema and its loader.

Each component declares its own section next to its code (`shards.config`, `cluster.config`, and the
training sections below); `RootConfig` composes them. Loading is `OmegaConf.structured(RootConfig)` <- YAML
file <- dotted CLI overrides, then every section's `__post_init__` checks run. Any problem raises
`ConfigError`, whose message names the key path and the file; entry scripts turn it into exit code 2 before
anything starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cluster.config import ClusterConfig
from shards.config import DataConfig

TARGET_ENCODINGS = ("clip", "fused_empty")
ATTENTION_IMPLS = ("fused", "eager")
PRECISIONS = ("auto", "bf16", "fp32")


class ConfigError(ValueError):
    """A config that must not start a job. The message names the key path and the file."""


@dataclass
class ModelConfig:
    """The ConText-CIR network: open_clip towers plus the cross-attention fusion head."""

    backbone: str = "ViT-B-32"
    """open_clip model name (`ViT-B-32`, `ViT-B-16`, `ViT-L-14`, `ViT-H-14`, any open_clip model, or `ContextTiny`)."""
    pretrained: str | None = None
    """open_clip pretrained tag (e.g. `laion2b_s32b_b79k`), fetched into `cache_dir` by open_clip; None: random init."""
    weights_file: str | None = None
    """Local open_clip weights (`.safetensors`, or a state dict loaded with weights_only=True); wins over `pretrained`."""
    cache_dir: str | None = None
    """open_clip's download cache for `pretrained`."""
    fusion_layers: int = 4
    """Cross-attention + FFN blocks in the fusion head."""
    fusion_heads: int = 8
    """Attention heads of each fusion block."""
    ffn_mult: int = 4
    """FFN hidden width as a multiple of the model width."""
    target_encoding: str = "clip"
    """Gallery/target encoder: `clip` (CLIP image embedding) or `fused_empty` (the fusion model with empty text)."""
    attention: str = "fused"
    """Fusion attention kernels: `fused` (scaled_dot_product_attention) or `eager` (reference, for tests)."""
    grad_checkpointing: bool = False
    """Activation checkpointing in the image and text towers."""
    compile: bool = False
    """Wrap the model in torch.compile."""
    init_from: str | None = None
    """A `model.safetensors` to initialise all weights from (weights only: no optimizer, step or data state)."""

    def __post_init__(self) -> None:
        if self.target_encoding not in TARGET_ENCODINGS:
            raise ValueError(f"model.target_encoding={self.target_encoding!r} must be one of {TARGET_ENCODINGS}")
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(f"model.attention={self.attention!r} must be one of {ATTENTION_IMPLS}")
        if self.fusion_layers < 1 or self.fusion_heads < 1 or self.ffn_mult < 1:
            raise ValueError("model.fusion_layers, model.fusion_heads and model.ffn_mult must be >= 1")


@dataclass
class LossConfig:
    """Contrastive loss plus the Text Concept-Consistency loss."""

    temperature: float = 0.07
    """Softmax temperature tau of the contrastive loss."""
    lambda_cc: float = 0.08
    """Weight of the Text-CC loss in the total."""
    cc_epsilon: float = 0.05
    """Slack of the Text-CC loss: ReLU(|ctx - iso| - epsilon)."""
    reference_negatives: bool = True
    """Score queries against the gathered reference images too (hard negatives, never positives)."""
    symmetric: bool = True
    """Add the target -> query contrastive term."""

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError("loss.temperature must be positive")
        if self.lambda_cc < 0 or self.cc_epsilon < 0:
            raise ValueError("loss.lambda_cc and loss.cc_epsilon must be >= 0")


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

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"optim.min_lr ({self.min_lr}) must be in [0, optim.lr ({self.lr})] and lr positive")
        if self.warmup_steps < 0 or self.restart_every < 1:
            raise ValueError("optim.warmup_steps must be >= 0 and optim.restart_every >= 1")


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
    overlap_comm: bool = True
    """Overlap gradient reduction with the backward pass."""
    reduce_bucket_size: int = 500_000_000
    """Elements per gradient-reduction bucket."""
    allgather_bucket_size: int = 500_000_000
    """Elements per parameter all-gather bucket."""

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"deepspeed.zero_stage={self.zero_stage} must be 0, 1, 2 or 3")
        if self.precision not in PRECISIONS:
            raise ValueError(f"deepspeed.precision={self.precision!r} must be one of {PRECISIONS}")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("deepspeed.offload_optimizer needs deepspeed.zero_stage >= 1")


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

    def __post_init__(self) -> None:
        if self.steps < 1 or self.global_batch < 1 or self.micro_batch < 1:
            raise ValueError("train.steps, train.global_batch and train.micro_batch must be >= 1")
        if self.max_consecutive_skips < 1:
            raise ValueError("train.max_consecutive_skips must be >= 1")


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


@dataclass
class EvalConfig:
    """The separate evaluation job."""

    benchmarks: list[str] = field(default_factory=lambda: ["synthetic"])
    """Benchmarks scored per checkpoint: cirr, circo, fashioniq, patterncir, synthetic."""
    select_metric: str = "synthetic/recall@1"
    """`<benchmark>/<metric>` that picks the `best` checkpoint (higher is better)."""
    batch_size: int = 128
    """Images or queries per encoder batch."""
    loader_workers: int = 2
    """Image decoding processes."""
    poll_seconds: float = 60.0
    """Watch mode: seconds between scans for new checkpoints."""
    device: str = "auto"
    """`auto` (cuda when present), `cuda` or `cpu`."""
    cirr_root: str | None = None
    """Root holding `cirr/` (captions, image_splits) and the image folders."""
    circo_root: str | None = None
    """Root holding `annotations/` and `COCO2017_unlabeled/`."""
    circo_template: str = "Find a picture that also {shared_concept}, but {relative_caption}."
    """CIRCO query text; fields `shared_concept` and `relative_caption`."""
    fashioniq_root: str | None = None
    """Root holding `captions/`, `image_splits/` and `images/`."""
    patterncir_root: str | None = None
    """PatternCIR root in CIRR layout with a labelled test split."""
    synthetic_root: str | None = None
    """The synthetic benchmark's root (CIRR layout plus `objects.json`)."""
    splits: list[str] = field(default_factory=lambda: ["val"])
    """Splits to score; `test` also writes CIRR test1 / CIRCO test submission files."""
    patterncir_split: str = "test1"
    """PatternCIR's labelled split to score (`test1` with targets, or `val`)."""
    synthetic_split: str = "val"
    """The synthetic benchmark's split to score."""
    fashioniq_categories: list[str] = field(default_factory=lambda: ["dress", "shirt", "toptee"])
    """FashionIQ categories scored; the averages run over these."""
    top_k: int = 50
    """Predictions kept per query in the results JSON (and the length of submission rankings)."""

    def __post_init__(self) -> None:
        known = {"cirr", "circo", "fashioniq", "patterncir", "synthetic"}
        unknown = [name for name in self.benchmarks if name not in known]
        if unknown:
            raise ValueError(f"eval.benchmarks has unknown {unknown}; known: {sorted(known)}")
        if "/" not in self.select_metric:
            raise ValueError("eval.select_metric must read `<benchmark>/<metric>`, e.g. synthetic/recall@1")
        if self.batch_size < 1 or self.poll_seconds <= 0:
            raise ValueError("eval.batch_size must be >= 1 and eval.poll_seconds positive")
        bad_splits = [split for split in self.splits if split not in ("val", "test")]
        if bad_splits:
            raise ValueError(f"eval.splits has unknown {bad_splits}; known: ['val', 'test']")
        bad_categories = [name for name in self.fashioniq_categories if name not in ("dress", "shirt", "toptee")]
        if bad_categories:
            raise ValueError(f"eval.fashioniq_categories has unknown {bad_categories}; known: dress, shirt, toptee")
        if self.top_k < 50:
            raise ValueError("eval.top_k must be >= 50 (the CIRR and CIRCO servers read 50 predictions per query)")
        if self.device not in ("auto", "cuda", "cpu"):
            raise ValueError(f"eval.device={self.device!r} must be auto, cuda or cpu")


@dataclass
class RootConfig:
    """Everything a train, build or eval job reads."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        per_step = self.train.micro_batch * self.cluster.num_workers
        if self.train.global_batch % per_step:
            raise ValueError(
                f"train.global_batch={self.train.global_batch} is not divisible by train.micro_batch "
                f"({self.train.micro_batch}) x cluster.num_workers ({self.cluster.num_workers}) = {per_step}"
            )

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per optimizer step on each rank."""
        return self.train.global_batch // (self.train.micro_batch * self.cluster.num_workers)

    @property
    def run_dir(self) -> Path:
        """`<storage_path>/<run_name>`: checkpoints/, tensorboard/ and eval/ live here."""
        return Path(self.cluster.storage_path) / self.cluster.run_name


def _describe(error: OmegaConfBaseException, prefix: str) -> str:
    key = getattr(error, "full_key", None) or ""
    if prefix and not key.startswith(prefix):
        key = f"{prefix}.{key}" if key else prefix
    message = str(error).split("\n")[0]
    return f"{key}: {message}" if key else message


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RootConfig:
    """Build the validated config: schema defaults <- YAML file <- dotted overrides.

    Args:
        path: YAML file, or None for the schema defaults alone.
        overrides: `key.path=value` strings, applied last.

    Returns:
        The config as `RootConfig` dataclasses, every check passed.

    Raises:
        ConfigError: unknown key, wrong type, missing required value or a cross-field violation; the message
            names the key path and the file.
    """
    where = str(path) if path is not None else "<defaults>"
    merged = OmegaConf.structured(RootConfig)
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"config file not found: {file}")
        try:
            loaded = OmegaConf.load(file)
        except Exception as error:  # a YAML syntax error names line and column
            raise ConfigError(f"{where}: not valid YAML: {error}") from error
        if not isinstance(loaded, type(OmegaConf.create({}))):
            raise ConfigError(f"{where}: the top level must be a mapping of sections")
        # Merge section by section so that an error inside a list of sources still names its section.
        for section, value in loaded.items():
            try:
                merged = OmegaConf.merge(merged, {section: value})
            except OmegaConfBaseException as error:
                raise ConfigError(f"{where}: {_describe(error, str(section))}") from error
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"override {override!r} must read key.path=value")
        key, _, raw_value = override.partition("=")
        try:
            # `OmegaConf.update` walks list indices (`data.sources.0.path=...`), which a merged dotlist cannot.
            value = OmegaConf.from_dotlist([f"value={raw_value}"])["value"]
            OmegaConf.update(merged, key.strip(), value, merge=True, force_add=False)
        except OmegaConfBaseException as error:
            raise ConfigError(f"{where} (override {override!r}): {_describe(error, '')}") from error
        except (TypeError, IndexError, KeyError, ValueError) as error:
            raise ConfigError(f"{where} (override {override!r}): {key}: {error}") from error
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        raise ConfigError(f"{where}: missing required value(s): {', '.join(missing)}")
    try:
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        raise ConfigError(f"{where}: {_describe(error, '')}") from error
    except ValueError as error:
        raise ConfigError(f"{where}: {error}") from error
    assert isinstance(config, RootConfig)
    return config


def to_yaml(config: RootConfig) -> str:
    """The resolved config as YAML, saved with every checkpoint and eval result."""
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def to_container(config: RootConfig) -> dict[str, Any]:
    """The resolved config as plain dicts and lists (JSON-ready)."""
    container = OmegaConf.to_container(OmegaConf.structured(config), resolve=True)
    assert isinstance(container, dict)
    return container  # type: ignore[return-value]


def load_saved_config(path: str | Path) -> RootConfig:
    """Read a resolved config saved by `to_yaml` (a checkpoint's or an eval result's), validating it again."""
    return load_config(path)
