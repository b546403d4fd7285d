"""Benchmarks, one module each, found through the `BENCHMARKS` registry (see `base`).

Adding a benchmark is one new module here: a reader producing `BenchmarkSplit`s and a `register_benchmark` call.
"""

from __future__ import annotations

from training.evaluation.benchmarks.base import (
    BENCHMARKS,
    Benchmark,
    BenchmarkError,
    BenchmarkSplit,
    DatasetSettings,
    GroundedPhrase,
    Protocol,
    Query,
    register_benchmark,
)

__all__ = [
    "BENCHMARKS",
    "Benchmark",
    "BenchmarkError",
    "BenchmarkSplit",
    "DatasetSettings",
    "GroundedPhrase",
    "Protocol",
    "Query",
    "register_benchmark",
]
