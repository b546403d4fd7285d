"""The Text-CC ablation on the embedded default: lambda x seeds x tower init, trained and scored one run at a time.

Every cell is a real training job (Ray + DeepSpeed, `cluster.jobs.trainer.run_training`) followed by the eval job's
scoring of its final checkpoint (`training.evaluation.runner.Evaluator`). Finished cells are recorded in
`<storage>/ablation/results.jsonl`, one line each, so an interrupted sweep resumes where it stopped and a finished
one only prints its table. The table reports each measure as mean +- sample standard deviation over the seeds.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RESULTS = "results.jsonl"
MEASURES = {
    "R@1 %": ("recall@1", 100.0, 1),
    "Rs@1 %": ("recall_subset@1", 100.0, 1),
    "pointing % (present, in-context)": ("grounding/context/present/pointing", 100.0, 1),
    "AUC (present, in-context)": ("grounding/context/present/auc", 1.0, 3),
    "pointing % (present, isolated)": ("grounding/isolated/present/pointing", 100.0, 1),
}
"""Table column -> (key of the model's metrics in the eval result, display scale, decimals)."""


@dataclass(frozen=True)
class Cell:
    init: str
    """`random` or `pretrained` towers."""
    lambda_cc: float
    seed: int

    @property
    def run_name(self) -> str:
        return f"ablation-{self.init}-lambda{self.lambda_cc:g}-seed{self.seed}"

    def overrides(self, steps: int, towers: str | None) -> list[str]:
        settings = [
            f"loss.lambda_cc={self.lambda_cc}",
            f"train.seed={self.seed}",
            f"train.steps={steps}",
            f"optim.restart_every={steps}",  # one cosine cycle: every cell ends at optim.min_lr
            f"checkpoint.every_steps={steps}",
            "checkpoint.keep=1",
            f"cluster.run_name={self.run_name}",
        ]
        if self.init == "pretrained":
            if towers is None:
                raise ValueError("pretrained cells need the towers file (--towers)")
            settings.append(f"model.weights_file={towers}")
        return settings


def cells(inits: Sequence[str], lambdas: Sequence[float], seeds: Sequence[int]) -> Iterator[Cell]:
    for init in inits:
        if init not in ("random", "pretrained"):
            raise ValueError(f"unknown init {init!r}: random or pretrained")
        for value in lambdas:
            for seed in seeds:
                yield Cell(init, float(value), int(seed))


def read_results(path: Path) -> dict[str, dict[str, Any]]:
    """run name -> its recorded line."""
    if not path.is_file():
        return {}
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {line["run"]: line for line in lines}


def append_result(path: Path, cell: Cell, steps: int, metrics: dict[str, float]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    line = {"run": cell.run_name, "init": cell.init, "lambda_cc": cell.lambda_cc, "seed": cell.seed, "steps": steps}
    with path.open("a") as handle:
        handle.write(json.dumps({**line, "metrics": metrics}) + "\n")


def model_metrics(result: dict[str, Any], benchmark: str = "synthetic") -> dict[str, float]:
    """The scored model's flat metrics of one benchmark in an eval result."""
    entry = result["benchmarks"][benchmark]
    metrics = entry.get("metrics", entry)
    return {key: float(value) for key, value in metrics.get("model", metrics).items() if _number(value)}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, float("nan")
    return mean, math.sqrt(sum((value - mean) ** 2 for value in values) / (len(values) - 1))


def table(results: dict[str, dict[str, Any]]) -> str:
    """Markdown: one row per (init, lambda), mean +- std over its seeds for every measure."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for line in results.values():
        groups.setdefault((line["init"], line["lambda_cc"]), []).append(line)
    header = "| towers | lambda | seeds | " + " | ".join(MEASURES) + " |"
    rows = [header, "|" + "---|" * (3 + len(MEASURES))]
    for (init, value), lines in sorted(groups.items()):
        cells_text = []
        for key, scale, digits in MEASURES.values():
            values = [line["metrics"][key] * scale for line in lines if key in line["metrics"]]
            if not values:
                cells_text.append("n/a")
                continue
            mean, std = mean_std(values)
            cells_text.append(f"{mean:.{digits}f} ± {std:.{digits}f}")
        rows.append(f"| {init} | {value:g} | {len(lines)} | " + " | ".join(cells_text) + " |")
    return "\n".join(rows)
