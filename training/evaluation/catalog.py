"""The docs tables of what the eval job can score, generated from the benchmark and method registries.

`python launch/eval.py --list` prints them; docs/evaluation.md holds the same text, and a test keeps the two equal.
"""

from __future__ import annotations

from dataclasses import fields

from training.evaluation.benchmarks import BENCHMARKS
from training.evaluation.methods import METHODS


def benchmark_table() -> str:
    """One markdown row per registered benchmark: name, its `eval.datasets.<name>` keys, data and protocol."""
    rows = ["| benchmark | `eval.datasets.<name>` keys | data and protocol |", "|---|---|---|"]
    for name, benchmark in BENCHMARKS:
        keys = ", ".join(f"`{field.name}`" for field in fields(benchmark.settings))
        rows.append(f"| `{name}` | {keys} | {benchmark.summary} |")
    return "\n".join(rows)


def method_table() -> str:
    """One markdown row per registered method."""
    rows = ["| method | query against gallery |", "|---|---|"]
    rows += [f"| `{name}` | {method.summary} |" for name, method in METHODS]
    return "\n".join(rows)
