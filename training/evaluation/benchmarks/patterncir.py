"""PatternCIR (TisCIR's remote-sensing benchmark): CIRR's layout with a labelled test split.

Protocol: recall@{1,5,10,20,50} over the split's images with the reference removed, and recall_subset@{1,2,3}
within `img_set.members` minus the reference.
"""

from __future__ import annotations

from pathlib import Path

from training.evaluation.benchmarks.base import BenchmarkSplit, Protocol
from training.evaluation.benchmarks.cirr import read_cirr_layout

PATTERNCIR_PROTOCOL = Protocol(recall_ks=(1, 5, 10, 20, 50), subset_ks=(1, 2, 3), remove_reference=True)


def read_patterncir(root: str | Path, split: str = "test1") -> BenchmarkSplit:
    """Read PatternCIR's labelled split (`test1` by default, or `val`); every entry must carry `target_hard`."""
    return read_cirr_layout(root, split, name="patterncir", protocol=PATTERNCIR_PROTOCOL, require_labels=True)
