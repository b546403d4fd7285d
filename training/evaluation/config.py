"""Config section `eval`: the separate evaluation job. Benchmark and method names come from their registries."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from training.evaluation.benchmarks import BENCHMARKS, DatasetSettings
from training.evaluation.methods import METHODS, method_name

if TYPE_CHECKING:  # config validation must not import torch
    import torch

SPLITS = ("val", "test")


@dataclass
class EvalConfig:
    """The separate evaluation job."""

    benchmarks: list[str] = field(default_factory=lambda: ["synthetic"])
    """Benchmarks scored per checkpoint, by registered name (`python launch/eval.py --list`)."""
    datasets: dict[str, Any] = field(default_factory=dict)
    """Per benchmark name: `root` (the benchmark in its distributed layout) and that benchmark's own options, e.g.
    `eval.datasets.circo.template`; `python launch/eval.py --list` shows them."""
    baselines: list[str] = field(default_factory=lambda: ["image_only", "text_only", "image_text_sum"])
    """Methods scored beside the checkpoint's own, by registered name, on the same towers and protocol."""
    select_metric: str = "synthetic/recall@1"
    """`<benchmark>/<metric>` that picks the `best` checkpoint (higher is better)."""
    batch_size: int = 128
    """Images or queries per encoder batch."""
    loader_workers: int | None = None
    """Image decoding processes; None: 0 on CPU (decoding beside the model is faster there, ~1.5x against one
    worker) and up to 8 on a GPU, where decoding overlaps the encoder."""
    poll_seconds: float = 60.0
    """Watch mode: seconds between scans for new checkpoints."""
    device: str = "auto"
    """`auto` (cuda when present), `cuda` or `cpu`."""
    splits: list[str] = field(default_factory=lambda: ["val"])
    """Splits to score; `test` also writes CIRR test1 / CIRCO test submission files."""
    top_k: int = 50
    """Predictions kept per query in the results JSON (and the length of submission rankings)."""

    def __post_init__(self) -> None:
        unknown = [name for name in self.benchmarks if name not in BENCHMARKS]
        if unknown:
            raise ValueError(f"eval.benchmarks has unknown {unknown}; registered: {BENCHMARKS.names()}")
        for name in self.datasets:
            self.dataset(name)  # every entry must fit its benchmark's settings schema
        unknown = [name for name in self.baselines if method_name(name) not in METHODS]
        if unknown:
            raise ValueError(f"eval.baselines has unknown {unknown}; registered: {METHODS.names()}")
        if "/" not in self.select_metric:
            raise ValueError("eval.select_metric must read `<benchmark>/<metric>`, e.g. synthetic/recall@1")
        if self.loader_workers is not None and self.loader_workers < 0:
            raise ValueError("eval.loader_workers must be >= 0")
        if self.batch_size < 1 or self.poll_seconds <= 0:
            raise ValueError("eval.batch_size must be >= 1 and eval.poll_seconds positive")
        bad_splits = [split for split in self.splits if split not in SPLITS]
        if bad_splits:
            raise ValueError(f"eval.splits has unknown {bad_splits}; known: {list(SPLITS)}")
        if self.top_k < 50:
            raise ValueError("eval.top_k must be >= 50 (the CIRR and CIRCO servers read 50 predictions per query)")
        if self.device not in ("auto", "cuda", "cpu"):
            raise ValueError(f"eval.device={self.device!r} must be auto, cuda or cpu")

    def dataset(self, name: str) -> DatasetSettings:
        """The validated `eval.datasets.<name>` of a registered benchmark (its defaults when the entry is absent).

        Raises:
            ValueError: an unregistered name, or an entry that does not fit the benchmark's settings; the message
                names the key path.
        """
        if name not in BENCHMARKS:
            raise ValueError(f"eval.datasets.{name}: no such benchmark; registered: {BENCHMARKS.names()}")
        schema = BENCHMARKS.get(name).settings
        given = self.datasets.get(name) or {}
        try:
            settings = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), given))
        except OmegaConfBaseException as error:
            key = getattr(error, "full_key", "") or ""
            raise ValueError(f"eval.datasets.{name}.{key}: {str(error).splitlines()[0]}") from error
        except ValueError as error:
            raise ValueError(f"eval.datasets.{name}: {error}") from error
        assert isinstance(settings, DatasetSettings)
        return settings

    def workers_for(self, device: torch.device) -> int:
        """Decoding processes for `device`: `loader_workers`, or the faster default for the device type."""
        if self.loader_workers is not None:
            return self.loader_workers
        return min(8, os.cpu_count() or 1) if device.type == "cuda" else 0

    def unset_roots(self, names: list[str]) -> list[str]:
        """The `eval.datasets.<name>.root` keys that the benchmarks in `names` need but the config leaves empty."""
        return [f"eval.datasets.{name}.root" for name in names if not self.dataset(name).root]


class EvalJob(Protocol):
    """What the eval job reads of the root config (`cluster.root_config.RootConfig` provides it)."""

    eval: EvalConfig

    @property
    def run_dir(self) -> Path:
        """The run whose checkpoints are scored; results go to `<run_dir>/eval/`."""
