"""The root config schema: every section, composed here because this is the package that sees them all.

Each section is declared next to the code it configures. The training package never names this class: its
training job reads the root through `training.trainer.job.TrainJob` and the eval job through
`training.evaluation.config.EvalJob`, protocols this schema provides.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cluster.runtime.config import ClusterConfig
from cluster.serving.config import ServeConfig
from shards.config import DataConfig
from shards.generate.config import GenerateConfig
from training.checkpoint.config import CheckpointConfig
from training.config_loader import load_structured
from training.engine.config import BatchGeometry, DeepSpeedConfig, OptimConfig
from training.evaluation.config import EvalConfig
from training.model.config import ModelConfig
from training.monitor.config import LoggingConfig
from training.objectives.config import LossConfig
from training.objectives.pretrain_config import PretrainConfig
from training.retrieval.config import IndexConfig
from training.trainer.config import TrainConfig
from training.zeroshot.config import MethodsConfig

RENAMED_KEYS = {
    "eval.cirr_root": "eval.datasets.cirr.root",
    "eval.circo_root": "eval.datasets.circo.root",
    "eval.circo_template": "eval.datasets.circo.template",
    "eval.fashioniq_root": "eval.datasets.fashioniq.root",
    "eval.fashioniq_categories": "eval.datasets.fashioniq.categories",
    "eval.patterncir_root": "eval.datasets.patterncir.root",
    "eval.patterncir_split": "eval.datasets.patterncir.split",
    "eval.synthetic_root": "eval.datasets.synthetic.root",
    "eval.synthetic_split": "eval.datasets.synthetic.split",
}
"""Keys that moved when benchmarks became registered plug-ins; an old key's error names its new place."""


@dataclass
class RootConfig:
    """Everything a train, build, eval, index or serve job reads."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    methods: MethodsConfig = field(default_factory=MethodsConfig)

    def __post_init__(self) -> None:
        self.train.geometry(self.cluster.num_workers)  # the global batch must split evenly
        if self.train.objective == "towers" and self.model.freeze == "both":
            raise ValueError("train.objective=towers trains only the towers, but model.freeze=both freezes them both")
        if self.loss.needs_starting_towers and not (self.model.weights_file or self.model.pretrained):
            raise ValueError(
                "loss.cc_target=towers and loss.lambda_grounding read the phrase maps of the towers the run starts "
                "from: set model.weights_file or model.pretrained (random towers ground nothing)"
            )

    @property
    def world_size(self) -> int:
        """Training ranks (`cluster.num_workers`)."""
        return self.cluster.num_workers

    @property
    def use_gpu(self) -> bool:
        """One GPU per rank (`cluster.use_gpu`)."""
        return self.cluster.use_gpu

    @property
    def batch(self) -> BatchGeometry:
        """The global batch split over the ranks."""
        return self.train.geometry(self.world_size)

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per optimizer step on each rank."""
        return self.batch.accumulation_steps

    @property
    def run_name(self) -> str:
        return self.cluster.run_name

    @property
    def run_dir(self) -> Path:
        """`<storage_path>/<run_name>`: checkpoints/, tensorboard/ and eval/ live here."""
        return Path(self.cluster.storage_path) / self.cluster.run_name


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RootConfig:
    """The validated root config: defaults <- YAML file <- dotted overrides (see `training.config_loader`).

    Raises:
        training.config_loader.ConfigError: the message names the key path and the file.
    """
    return load_structured(RootConfig, path, overrides, RENAMED_KEYS)
