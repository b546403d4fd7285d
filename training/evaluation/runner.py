"""Evaluate one checkpoint: load weights + saved config, score every benchmark, write JSON, TensorBoard, `best`.

Outputs under the checkpoint's run directory:

    <run>/eval/step_XXXXXXXX.json               metrics, baselines, versions, resolved config, top-k predictions
    <run>/eval/best.json                        the best checkpoint so far by eval.select_metric
    <run>/eval/submissions/step_XXXXXXXX/       CIRR test1 / CIRCO test files (when eval.splits has `test`)
    <run>/eval/predictions/step_XXXXXXXX/<benchmark>/<method>.json
                                                every other method's top-k predictions (the model's are in the JSON)
    <run>/tensorboard/                          eval/<benchmark>/<metric> of the model at the checkpoint's training
                                                step (grounding: eval/synthetic/grounding/<map>/<phrases>/<measure>),
                                                and eval/<benchmark>/<method>/<metric> for every method

A benchmark's diagnostic splits (the synthetic `binding` split) are scored after its own and merged into its metrics,
predictions and TensorBoard tags as `<split>/<metric>` (`eval/synthetic/binding/recall@1`), never averaged in.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from shards import model_inputs
from training.checkpoint import layout
from training.config_loader import ConfigError, load_section, read_container, to_container
from training.evaluation.benchmarks import BENCHMARKS, BenchmarkSplit
from training.evaluation.config import EvalJob
from training.evaluation.encode import resolve_device
from training.evaluation.grounding import format_grounding, is_grounding_measure
from training.evaluation.methods import METHODS, method_name
from training.evaluation.scoring import MODEL, EncodeSettings, SplitScores, add_diagnostic, combine_parts, score_split
from training.evaluation.spans import phrase_span_finder
from training.model.config import ModelConfig

logger = logging.getLogger(__name__)

EVAL_DIR = "eval"
BEST = "best.json"
TENSORBOARD = "tensorboard"
CHECKPOINT_METHOD = "context"
"""The method a ConText-CIR checkpoint is scored as (its results are `metrics`; the baselines sit beside it)."""


class CheckpointError(ValueError):
    """The path is not a complete checkpoint that eval may read."""


def result_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / EVAL_DIR / f"{layout.checkpoint_tag(step)}.json"


def resolve_checkpoint(path: str | Path) -> tuple[int, Path]:
    """A checkpoint directory, or a run's `checkpoints/latest` pointer, -> (step, directory).

    Raises:
        CheckpointError: missing, incomplete (no COMPLETE marker), or without a step.
    """
    path = Path(path)
    if path.name == layout.LATEST and path.parent.name == layout.CHECKPOINTS:
        latest = layout.latest_complete(path.parent.parent)
        if latest is None:
            raise CheckpointError(f"{path}: the run has no complete checkpoint yet")
        return latest
    if not path.is_dir():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not layout.is_complete(path):
        raise CheckpointError(f"{path} is not a complete checkpoint (no {layout.MARKER} marker); refusing to read it")
    step = layout.step_of(path)
    if step is None:  # renamed or copied out of its run (how checkpoints are shared): the trainer state knows
        step = saved_step(path)
    return step, path


def saved_step(checkpoint: Path) -> int:
    """The training step `trainer_state.json` records: `train.step`, as `Checkpointer.save` writes it.

    Raises:
        CheckpointError: the file is missing or unreadable, or records no step.
    """
    state_file = checkpoint / layout.TRAINER_STATE
    try:
        return int(json.loads(state_file.read_text())["train"]["step"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise CheckpointError(
            f"{checkpoint}: no step in its name or in {state_file} (train.step): {type(error).__name__}: {error}"
        ) from error


def run_dir_of(checkpoint: Path, fallback: Path) -> Path:
    """`<run>` for `<run>/checkpoints/step_X`; otherwise the job config's run directory."""
    return checkpoint.parent.parent if checkpoint.parent.name == layout.CHECKPOINTS else fallback


def load_checkpoint_model(checkpoint: Path, device: torch.device) -> tuple[torch.nn.Module, ModelConfig]:
    """Build the model from the `model` section of the checkpoint's saved config and load `model.safetensors`.

    Nothing is unpickled. Only the `model` section is read, so checkpoints written before other sections changed
    still evaluate.

    Raises:
        CheckpointError: a file is missing, the config is unusable, or the weights cannot be loaded into it.
    """
    from training.model.context_cir import rebuild_model

    config_file, weights_file = checkpoint / layout.CONFIG, checkpoint / layout.WEIGHTS
    for needed in (config_file, weights_file):
        if not needed.is_file():
            raise CheckpointError(f"checkpoint file missing: {needed}")
    try:
        saved = load_section(config_file, "model", ModelConfig)
    except ConfigError as error:
        raise CheckpointError(f"checkpoint config unusable: {error}") from error
    try:
        return rebuild_model(saved, weights_file, device), saved
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:  # truncated, corrupt or another network's
        raise CheckpointError(f"{weights_file}: cannot load the weights ({type(error).__name__}: {error})") from error


def _benchmark_entry(
    split: BenchmarkSplit | list[BenchmarkSplit],
    scores: SplitScores,
    baselines: list[str],
    diagnostics: list[BenchmarkSplit] | None = None,
) -> dict[str, Any]:
    splits = split if isinstance(split, list) else [split]
    versions = {part.name.split("/")[-1]: part.version for part in splits}
    entry = {
        "split": splits[0].split,
        "version": versions if len(splits) > 1 else splits[0].version,
        "metrics": scores.metrics.get(MODEL, {}),
        "baselines": {name: scores.metrics.get(name, {}) for name in baselines},
        "details": scores.details,
        "predictions": scores.predictions,
    }
    if diagnostics:
        entry["diagnostics"] = {part.split: part.version for part in diagnostics}
    return entry


class Evaluator:
    """Scores checkpoints of one run on the configured benchmarks; benchmark files are read once and reused."""

    def __init__(self, config: EvalJob, benchmarks: list[str] | None = None, methods: list[str] | None = None) -> None:
        """`methods`: the methods scored beside the checkpoint's own (`eval.baselines` when None); `context`, the
        checkpoint's own, is always scored and may be named among them."""
        self.config = config
        self.benchmarks = list(benchmarks if benchmarks is not None else config.eval.benchmarks)
        self.device = resolve_device(config.eval.device)
        others = [method_name(name) for name in (methods if methods is not None else config.eval.baselines)]
        self.baselines = [name for name in dict.fromkeys(others) if name != CHECKPOINT_METHOD]
        self.methods = {MODEL: METHODS.get(CHECKPOINT_METHOD)} | {name: METHODS.get(name) for name in self.baselines}
        self._splits: dict[str, tuple[list[BenchmarkSplit], BenchmarkSplit | None]] = {}
        self._diagnostics: dict[str, list[BenchmarkSplit]] = {}

    def splits(self, name: str) -> tuple[list[BenchmarkSplit], BenchmarkSplit | None]:
        """(scored splits, submission split) of a benchmark, read on first use."""
        if name not in self._splits:
            benchmark, settings, splits = BENCHMARKS.get(name), self.config.eval.dataset(name), self.config.eval.splits
            self._splits[name] = (
                benchmark.scored_splits(settings, splits),
                benchmark.submission_split(settings, splits),
            )
            self._diagnostics[name] = benchmark.diagnostic_splits(settings) if self._splits[name][0] else []
        return self._splits[name]

    def diagnostics(self, name: str) -> list[BenchmarkSplit]:
        """A benchmark's diagnostic splits (reported as `<split>/<metric>`), read with its other splits."""
        self.splits(name)
        return self._diagnostics[name]

    def load_benchmarks(self) -> None:
        """Read every benchmark now, so missing files fail before any model is loaded."""
        for name in self.benchmarks:
            self.splits(name)

    def evaluate(self, checkpoint: str | Path) -> dict[str, Any]:
        """Score one complete checkpoint and write its JSON, TensorBoard scalars and the `best` pointer.

        Returns:
            The result written to `<run>/eval/step_XXXXXXXX.json`.
        """
        step, checkpoint_dir = resolve_checkpoint(checkpoint)
        run_dir = run_dir_of(checkpoint_dir, self.config.run_dir)
        self.load_benchmarks()
        started = time.time()
        model, saved = load_checkpoint_model(checkpoint_dir, self.device)
        settings = EncodeSettings(
            methods=self.methods,
            # uint8 pixels, normalised by the model on the device: a quarter of the loader's shared memory.
            transform=model_inputs.uint8_transform(saved.backbone),
            tokenize=model_inputs.tokenizer(saved.backbone),
            device=self.device,
            batch_size=self.config.eval.batch_size,
            workers=self.config.eval.workers_for(self.device),
            top_k=self.config.eval.top_k,
            find_spans=phrase_span_finder(saved.backbone),
            config=self.config,
            backbone=saved.backbone,
        )
        result: dict[str, Any] = {
            "step": step,
            "checkpoint": str(checkpoint_dir),
            "device": str(self.device),
            "benchmarks": {},
            "submissions": {},
        }
        for name in self.benchmarks:
            scored, unlabelled = self.splits(name)
            if scored:
                parts = {split.name.split("/")[-1]: score_split(model, split, settings) for split in scored}
                combined = combine_parts(parts)
                diagnostics = self.diagnostics(name)
                for diagnostic in diagnostics:
                    add_diagnostic(combined, diagnostic.split, score_split(model, diagnostic, settings))
                entry = _benchmark_entry(
                    scored if len(scored) > 1 else scored[0], combined, self.baselines, diagnostics
                )
                result["benchmarks"][name] = entry
                entry["method_predictions"] = write_method_predictions(run_dir, step, name, combined)
            if unlabelled is not None:
                out_dir = run_dir / EVAL_DIR / "submissions" / layout.checkpoint_tag(step)
                own = dataclasses.replace(settings, methods={MODEL: settings.methods[MODEL]})  # the file needs no other
                scores = score_split(model, unlabelled, own)
                write = BENCHMARKS.get(name).write_submission
                written = write(out_dir, unlabelled, scores.predictions, scores.subset_predictions)
                result["submissions"][name] = [str(path) for path in written]
        result["seconds"] = round(time.time() - started, 2)
        result["config"] = to_container(self.config)
        result["checkpoint_config"] = read_container(checkpoint_dir / layout.CONFIG)
        del model
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        write_result(run_dir, step, result)
        log_tensorboard(run_dir, step, result)
        update_best(run_dir, step, result, self.config.eval.select_metric)
        return result


def write_method_predictions(run_dir: Path, step: int, benchmark: str, scores: SplitScores) -> dict[str, str]:
    """`<run>/eval/predictions/step_X/<benchmark>/<method>.json` (query id -> top-k names) for every method but the
    model, atomically; returns method -> path."""
    out_dir = Path(run_dir) / EVAL_DIR / "predictions" / layout.checkpoint_tag(step) / benchmark
    written = {}
    for method, predictions in scores.method_predictions.items():
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{method}.json"
        layout.write_atomically(path, json.dumps(predictions, indent=0) + "\n")
        written[method] = str(path)
    return written


def write_result(run_dir: Path, step: int, result: dict[str, Any]) -> Path:
    """`<run>/eval/step_XXXXXXXX.json`, atomically."""
    path = result_path(run_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    layout.write_atomically(path, json.dumps(result, indent=1, sort_keys=False) + "\n")
    return path


def log_tensorboard(run_dir: Path, step: int, result: dict[str, Any]) -> None:
    """`eval/<benchmark>/<metric>` for the model, and `eval/<benchmark>/<method>/<metric>` for every method (the
    model as `context`), so one TensorBoard chart per metric draws the methods side by side."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(Path(run_dir) / TENSORBOARD), filename_suffix=".eval")
    try:
        for name, entry in result["benchmarks"].items():
            for metric, value in entry["metrics"].items():
                writer.add_scalar(f"eval/{name}/{metric}", value, global_step=step)
            for method, metrics in {CHECKPOINT_METHOD: entry["metrics"], **entry["baselines"]}.items():
                for metric, value in metrics.items():
                    if not is_grounding_measure(metric):
                        writer.add_scalar(f"eval/{name}/{method}/{metric}", value, global_step=step)
    finally:
        writer.close()


def selected_value(result: dict[str, Any], select_metric: str) -> float | None:
    """The value `<benchmark>/<metric>` names in a result, or None when that benchmark/metric was not scored."""
    benchmark, _, metric = select_metric.partition("/")
    return result.get("benchmarks", {}).get(benchmark, {}).get("metrics", {}).get(metric)


def update_best(run_dir: Path, step: int, result: dict[str, Any], select_metric: str) -> bool:
    """Point `<run>/eval/best.json` at this checkpoint when its selected metric beats the best so far.

    Returns:
        True when the pointer now names this checkpoint.
    """
    value = selected_value(result, select_metric)
    if value is None:
        logger.warning("eval.select_metric %s was not scored at step %d; best pointer unchanged", select_metric, step)
        return False
    path = Path(run_dir) / EVAL_DIR / BEST
    try:
        current = json.loads(path.read_text())
    except (OSError, ValueError):
        current = None
    same_metric = current is not None and current.get("metric") == select_metric
    if same_metric and current.get("step") != step and float(current.get("value", float("-inf"))) >= value:
        return False
    best = {
        "metric": select_metric,
        "value": value,
        "step": step,
        "checkpoint": result["checkpoint"],
        "result": result_path(run_dir, step).name,
    }
    layout.write_atomically(path, json.dumps(best, indent=1) + "\n")
    return True


def format_table(result: dict[str, Any]) -> str:
    """A readable table per benchmark: the model beside the three baselines, in percent; then, for a benchmark that
    scores grounding, the model's grounding measures (rows map kind x phrase split)."""
    lines = [f"checkpoint step {result['step']} ({result['checkpoint']})"]
    for name, entry in result["benchmarks"].items():
        baselines = list(entry["baselines"])
        columns = (CHECKPOINT_METHOD, *baselines)
        version = entry["version"]
        parts = [version] if "queries" in version else [part for part in version.values() if isinstance(part, dict)]
        queries, gallery = (sum(int(part.get(key, 0)) for part in parts) for key in ("queries", "gallery"))
        counts = f"{queries} queries, gallery {gallery}" + (f" over {len(parts)} parts" if len(parts) > 1 else "")
        for split, diagnostic in entry.get("diagnostics", {}).items():
            counts += f"; {split}: {diagnostic.get('queries', 0)} queries, gallery {diagnostic.get('gallery', 0)}"
        lines.append("")
        lines.append(f"{name} [{entry['split']}] {counts}".rstrip())
        shown = [metric for metric in entry["metrics"] if not is_grounding_measure(metric)]
        width = max([22, *(len(metric) + 1 for metric in shown)])
        lines.append(f"  {'metric':<{width}}" + "".join(f"{column:>16}" for column in columns))
        for metric, value in entry["metrics"].items():
            if is_grounding_measure(metric):
                continue  # the model's alone, in a table of their own below
            cells = [value] + [entry["baselines"][baseline].get(metric) for baseline in baselines]
            lines.append(
                f"  {metric:<{width}}" + "".join(f"{'-' if c is None else f'{100 * c:.2f}':>16}" for c in cells)
            )
        lines.extend(format_grounding(entry["metrics"]))
    for name, paths in result.get("submissions", {}).items():
        lines.append(f"{name} submission file(s): {', '.join(paths)}")
    return "\n".join(lines)
