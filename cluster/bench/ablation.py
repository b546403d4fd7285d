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
RETRIEVAL = {
    "R@1 %": ("recall@1", 100.0, 1),
    "R@5 %": ("recall@5", 100.0, 1),
    "Rs@1 %": ("recall_subset@1", 100.0, 1),
    "binding R@1 %": ("binding/recall@1", 100.0, 1),
    "binding Rs@1 %": ("binding/recall_subset@1", 100.0, 1),
}
"""Retrieval table column -> (key of the model's metrics in the eval result, display scale, decimals)."""
GROUNDING = {
    f"{label} pointing % / AUC": (f"grounding/{kind}/present/pointing", f"grounding/{kind}/present/auc")
    for label, kind in (("in-context", "context"), ("isolated", "isolated"), ("tower", "tower"))
}
"""Grounding table column -> (pointing key, AUC key), present-object phrases, for each map kind."""
PAIRED = {
    "R@1": ("recall@1", 100.0, 1),
    "binding Rs@1": ("binding/recall_subset@1", 100.0, 1),
    "pointing, in-context": ("grounding/context/present/pointing", 100.0, 1),
    "pointing, tower": ("grounding/tower/present/pointing", 100.0, 1),
}
"""Paired-difference table column (against the same seed's lambda-0 run, in points) -> key, scale, decimals."""

LOGGED = ("contrastive_loss", "cc/raw", "cc/shape_gap", "cc/below", "grounding/raw")
"""Training-log figures (`metrics.jsonl`) the logged table reports, averaged over the first and the last steps."""
FIRST_STEPS, LAST_STEPS = 50, 100

VARIANTS: dict[str, tuple[str, ...]] = {
    "lambda0": ("loss.lambda_cc=0",),
    "paper": ("loss.lambda_cc=0.08",),
    "towers-l1": ("loss.lambda_cc=1", "loss.cc_target=towers", "loss.cc_form=l1"),
    "towers-spatial": ("loss.lambda_cc=1", "loss.cc_target=towers", "loss.cc_form=spatial"),
    "towers-spatial-keep": (
        "loss.lambda_cc=1",
        "loss.cc_target=towers",
        "loss.cc_form=spatial",
        "loss.lambda_grounding=1",
    ),
    "lambda0-keep": ("loss.lambda_cc=0", "loss.lambda_grounding=1"),
}
"""The concept-consistency variants of `launch/ablate_cc.py --variants`, each a set of `loss` overrides: no CC, the
paper's loss, the towers target under each form, and grounding preservation with and without the towers target."""
BASELINE = "lambda0"


@dataclass(frozen=True)
class Cell:
    init: str
    """`random` or `pretrained` towers."""
    lambda_cc: float
    seed: int
    variant: str = ""
    """A name of `VARIANTS` (its overrides set `lambda_cc` too), or empty: the paper's loss at `lambda_cc`."""

    @property
    def label(self) -> str:
        """The cell's row in the tables: its variant, or its lambda."""
        return self.variant or f"lambda {self.lambda_cc:g}"

    @property
    def run_name(self) -> str:
        if self.variant:
            return f"ablation-{self.init}-{self.variant}-seed{self.seed}"
        return f"ablation-{self.init}-lambda{self.lambda_cc:g}-seed{self.seed}"

    def overrides(self, steps: int, towers: str | None) -> list[str]:
        loss = VARIANTS[self.variant] if self.variant else (f"loss.lambda_cc={self.lambda_cc}",)
        settings = [
            *loss,
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


def variant_cells(inits: Sequence[str], variants: Sequence[str], seeds: Sequence[int]) -> Iterator[Cell]:
    """The cells of named `VARIANTS` (seeds innermost, like `cells`)."""
    unknown = [name for name in variants if name not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant {', '.join(unknown)}: one of {', '.join(VARIANTS)}")
    for init in inits:
        _check_init(init)
        for name in variants:
            lambda_cc = next(float(item.split("=")[1]) for item in VARIANTS[name] if item.startswith("loss.lambda_cc="))
            for seed in seeds:
                yield Cell(init, lambda_cc, int(seed), name)


def sweep_cells(inits: str, lambdas: str, variants: str | None, seeds: str) -> list[Cell]:
    """The cells of `launch/ablate_cc.py`'s comma lists: named variants when given, lambdas otherwise."""
    init_names = [name.strip() for name in inits.split(",")]
    seed_values = [int(value) for value in seeds.split(",")]
    if variants:
        return list(variant_cells(init_names, [name.strip() for name in variants.split(",")], seed_values))
    return list(cells(init_names, [float(value) for value in lambdas.split(",")], seed_values))


def run_cells(
    cells_to_run: Sequence[Cell], configs: Sequence[Any], results_path: Path, steps: int, rescore: bool
) -> None:
    """Train (unless `rescore`) and score each cell, recording its metrics as it finishes (call after `connect`).

    `rescore`: score the final checkpoint a recorded cell left and replace its line.
    """
    import time

    from cluster.jobs.trainer import run_training
    from training.evaluation.runner import Evaluator

    for number, (cell, config) in enumerate(zip(cells_to_run, configs), start=1):
        started = time.perf_counter()
        run_dir = config.run_dir if rescore else run_training(config)
        metrics = model_metrics(Evaluator(config, ["synthetic"]).evaluate(run_dir / "checkpoints" / "latest"))
        if rescore:
            replace_result(results_path, cell, metrics)
        else:
            append_result(results_path, cell, steps, metrics)
        print(
            f"[{number}/{len(cells_to_run)}] {cell.run_name}: R@1 {metrics.get('recall@1', float('nan')):.2f} "
            f"({time.perf_counter() - started:.0f} s)",
            flush=True,
        )


def report(results_path: Path, storage: Path) -> str:
    """Every table of the recorded cells, in markdown, also written to `table.md` beside the results."""
    results = read_results(results_path)
    markdown = table(results) + "\n\n" + logged_table(results, storage)
    (results_path.parent / "table.md").write_text(markdown + "\n")
    return markdown


def _check_init(init: str) -> None:
    if init not in ("random", "pretrained"):
        raise ValueError(f"unknown init {init!r}: random or pretrained")


def cells(inits: Sequence[str], lambdas: Sequence[float], seeds: Sequence[int]) -> Iterator[Cell]:
    for init in inits:
        _check_init(init)
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
    if cell.variant:
        line["variant"] = cell.variant
    with path.open("a") as handle:
        handle.write(json.dumps({**line, "metrics": metrics}) + "\n")


def replace_result(path: Path, cell: Cell, metrics: dict[str, float]) -> None:
    """Give a recorded cell new metrics (a rescore), rewriting the results file atomically."""
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for line in lines:
        if line["run"] == cell.run_name:
            line["metrics"] = metrics
    staged = path.with_name(path.name + ".tmp")
    staged.write_text("".join(json.dumps(line) + "\n" for line in lines))
    staged.replace(path)


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


def _label(line: dict[str, Any]) -> str:
    return line.get("variant") or f"lambda {line['lambda_cc']:g}"


def _order(key: tuple[str, str]) -> tuple[str, int, str]:
    init, label = key
    names = list(VARIANTS)
    return init, names.index(label) if label in names else len(names), label


def _groups(results: dict[str, dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for line in results.values():
        groups.setdefault((line["init"], _label(line)), []).append(line)
    return dict(sorted(groups.items(), key=lambda item: _order(item[0])))


def _spread(values: Sequence[float], digits: int) -> str:
    if not values:
        return "n/a"
    mean, std = mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _values(lines: Sequence[dict[str, Any]], key: str, scale: float) -> list[float]:
    return [line["metrics"][key] * scale for line in lines if key in line["metrics"]]


def logged_figures(metrics_file: Path) -> dict[str, tuple[float, float]]:
    """`LOGGED` key -> (mean over the first `FIRST_STEPS` logged steps, mean over the last `LAST_STEPS` steps)."""
    if not metrics_file.is_file():
        return {}
    lines = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    steps = [line for line in lines if "step" in line and "contrastive_loss" in line]
    if not steps:
        return {}
    last = max(line["step"] for line in steps)
    figures = {}
    for key in LOGGED:
        first = [line[key] for line in steps if key in line and line["step"] <= FIRST_STEPS]
        final = [line[key] for line in steps if key in line and line["step"] > last - LAST_STEPS]
        if first and final:
            figures[key] = (sum(first) / len(first), sum(final) / len(final))
    return figures


def logged_table(results: dict[str, dict[str, Any]], storage: Path) -> str:
    """Markdown: per (init, cell), the `LOGGED` training figures at the start -> the end, mean over seeds."""
    rows = [
        "| towers | cell | runs | " + " | ".join(f"`{key}`" for key in LOGGED) + " |",
        "|" + "---|" * (3 + len(LOGGED)),
    ]
    for (init, label), lines in _groups(results).items():
        runs = [logged_figures(storage / line["run"] / "metrics.jsonl") for line in lines]
        runs = [figures for figures in runs if figures]
        texts = []
        for key in LOGGED:
            pairs = [figures[key] for figures in runs if key in figures]
            if not pairs:
                texts.append("n/a")
                continue
            start, end = (sum(pair[index] for pair in pairs) / len(pairs) for index in (0, 1))
            texts.append(f"{start:.3g} → {end:.3g}")
        rows.append(f"| {init} | {label} | {len(runs)} | " + " | ".join(texts) + " |")
    return "\n".join(rows)


def table(results: dict[str, dict[str, Any]]) -> str:
    """Markdown: retrieval, grounding and paired differences against lambda 0, one row per (init, cell).

    Each entry is the mean +- sample standard deviation over the cell's seeds. A paired difference is taken per
    seed against the lambda-0 run of the same init and seed (variant `lambda0`, or the paper's loss at lambda 0).
    """
    groups = _groups(results)
    header = "| towers | cell | seeds | "
    retrieval = [header + " | ".join(RETRIEVAL) + " |", "|" + "---|" * (3 + len(RETRIEVAL))]
    grounding = [header + " | ".join(GROUNDING) + " |", "|" + "---|" * (3 + len(GROUNDING))]
    paired = [
        "| towers | cell | pairs | " + " | ".join(f"Δ {name}" for name in PAIRED) + " |",
        "|" + "---|" * (3 + len(PAIRED)),
    ]
    for (init, label), lines in groups.items():
        start = f"| {init} | {label} | {len(lines)} | "
        retrieval.append(
            start
            + " | ".join(_spread(_values(lines, key, scale), digits) for key, scale, digits in RETRIEVAL.values())
            + " |"
        )
        texts = []
        for pointing, auc in GROUNDING.values():
            points, areas = _values(lines, pointing, 100.0), _values(lines, auc, 1.0)
            texts.append(f"{_spread(points, 1)} / {_spread(areas, 3)}" if points else "n/a")
        grounding.append(start + " | ".join(texts) + " |")
        baseline = next(
            (group for (other, name), group in groups.items() if other == init and name in (BASELINE, "lambda 0")),
            None,
        )
        if baseline is None or label in (BASELINE, "lambda 0"):
            continue
        by_seed = {line["seed"]: line for line in baseline}
        pairs = [(line, by_seed[line["seed"]]) for line in lines if line["seed"] in by_seed]
        differences = []
        for key, scale, digits in PAIRED.values():
            deltas = [
                (line["metrics"][key] - base["metrics"][key]) * scale
                for line, base in pairs
                if key in line["metrics"] and key in base["metrics"]
            ]
            differences.append(_spread(deltas, digits) if deltas else "n/a")
        paired.append(f"| {init} | {label} | {len(pairs)} | " + " | ".join(differences) + " |")
    return "\n\n".join("\n".join(rows) for rows in (retrieval, grounding, paired))
