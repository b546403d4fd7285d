"""PatternCIR (TisCIR's remote-sensing benchmark): CIRR's layout with a labelled test split.

Protocol: recall@{1,5,10,20,50} over the split's images with the reference removed, and recall_subset@{1,2,3}
within `img_set.members` minus the reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from training.evaluation.benchmarks.base import Benchmark, BenchmarkSplit, DatasetSettings, Protocol, register_benchmark
from training.evaluation.benchmarks.cirr import read_cirr_layout

PATTERNCIR_PROTOCOL = Protocol(recall_ks=(1, 5, 10, 20, 50), subset_ks=(1, 2, 3), remove_reference=True)


def read_patterncir(root: str | Path, split: str = "test1") -> BenchmarkSplit:
    """Read PatternCIR's labelled split (`test1` by default, or `val`); every entry must carry `target_hard`."""
    return read_cirr_layout(root, split, name="patterncir", protocol=PATTERNCIR_PROTOCOL, require_labels=True)


@dataclass
class PatternCIRSettings(DatasetSettings):
    """`eval.datasets.patterncir`."""

    split: str = "test1"
    """The labelled split to score (`test1` with targets, or `val`)."""


def _scored(settings: PatternCIRSettings, splits: Sequence[str]) -> list[BenchmarkSplit]:
    del splits  # PatternCIR's test split is labelled: it is scored, never submitted
    return [read_patterncir(settings.root, settings.split)]


register_benchmark(
    Benchmark(
        name="patterncir",
        protocol=PATTERNCIR_PROTOCOL,
        read=_scored,
        summary="PatternCIR (TisCIR's remote-sensing benchmark, CIRR layout, labelled `split`): R@{1,5,10,20,50} + "
        "Rs@{1,2,3}, reference removed",
        settings=PatternCIRSettings,
    )
)
