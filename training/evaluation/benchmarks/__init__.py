"""Benchmark readers, one per public layout, all producing `BenchmarkSplit`s.

`scored_splits` gives the labelled splits a checkpoint is scored on; `submission_split` gives the unlabelled test
split whose rankings go to a server (CIRR test1, CIRCO test) when `eval.splits` asks for `test`.
"""

from __future__ import annotations

from training.config_loader import EvalConfig
from training.evaluation.benchmarks.base import BenchmarkError, BenchmarkSplit, GroundedPhrase, Protocol, Query
from training.evaluation.benchmarks.circo import read_circo
from training.evaluation.benchmarks.cirr import read_cirr
from training.evaluation.benchmarks.fashioniq import read_fashioniq
from training.evaluation.benchmarks.patterncir import read_patterncir
from training.evaluation.benchmarks.synthetic import read_synthetic

SUBMISSION_BENCHMARKS = ("cirr", "circo")


def _root(config: EvalConfig, name: str) -> str:
    root = getattr(config, f"{name}_root")
    if not root:
        raise BenchmarkError(f"eval.{name}_root is not set, but eval.benchmarks lists {name}")
    return root


def unset_roots(config: EvalConfig, names: list[str]) -> list[str]:
    """The `eval.<name>_root` keys that benchmarks in `names` need but the config leaves empty."""
    return [f"eval.{name}_root" for name in names if not getattr(config, f"{name}_root", None)]


def scored_splits(name: str, config: EvalConfig) -> list[BenchmarkSplit]:
    """The labelled splits of benchmark `name` (FashionIQ: one per category), read from the configured root.

    Raises:
        BenchmarkError: the root is unset, or a file or image is missing (the message names the path).
    """
    if name == "cirr":
        return [read_cirr(_root(config, name), "val")] if "val" in config.splits else []
    if name == "circo":
        return [read_circo(_root(config, name), "val", config.circo_template)] if "val" in config.splits else []
    if name == "fashioniq":
        if "val" not in config.splits:
            return []
        return [read_fashioniq(_root(config, name), category) for category in config.fashioniq_categories]
    if name == "patterncir":
        return [read_patterncir(_root(config, name), config.patterncir_split)]
    if name == "synthetic":
        return [read_synthetic(_root(config, name), config.synthetic_split)]
    raise BenchmarkError(f"unknown benchmark {name!r}")


def submission_split(name: str, config: EvalConfig) -> BenchmarkSplit | None:
    """CIRR test1 or CIRCO test when `test` is in eval.splits; None for benchmarks without a server."""
    if "test" not in config.splits or name not in SUBMISSION_BENCHMARKS:
        return None
    if name == "cirr":
        return read_cirr(_root(config, name), "test1")
    return read_circo(_root(config, name), "test", config.circo_template)


__all__ = [
    "BenchmarkError",
    "BenchmarkSplit",
    "GroundedPhrase",
    "Protocol",
    "Query",
    "scored_splits",
    "submission_split",
    "unset_roots",
]
