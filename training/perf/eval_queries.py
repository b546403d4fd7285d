"""`launch/bench.py eval`: the eval job's query encoding with and without grounding, timed side by side.

The queries of the configured synthetic split (`eval.datasets.synthetic`, written by `launch/make_synthetic.py`)
are encoded by a randomly initialised model of `model.backbone`, once scoring grounding and once not, alternating
`repeats` times; the fastest of each is reported. Grounding reads the concept maps from the same pass as the
queries, so its cost is the maps alone once the phrases' token spans are known: they are found on a benchmark's
first pass and cached (a watcher scores the same benchmark at every checkpoint); the first pass is reported too.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from typing import Any

import torch

from shards.model_inputs import eval_transform, tokenizer
from training.evaluation.benchmarks import BENCHMARKS
from training.evaluation.config import EvalJob
from training.evaluation.encode import encode_queries, resolve_device
from training.evaluation.methods import METHODS
from training.evaluation.spans import phrase_span_finder
from training.model.config import ModelConfig


def eval_query_benchmark(config: EvalJob, model_config: ModelConfig, repeats: int, limit: int) -> dict[str, Any]:
    """Seconds to encode the first `limit` synthetic queries with and without grounding, and their ratio."""
    from training.model.context_cir import build_model

    device = resolve_device(config.eval.device)
    settings = config.eval.dataset("synthetic")
    (split,) = BENCHMARKS.get("synthetic").scored_splits(settings, config.eval.splits)
    split = dataclasses.replace(split, queries=split.queries[:limit])
    without = dataclasses.replace(split, protocol=dataclasses.replace(split.protocol, grounding=False))
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(model_config, pretrained=None, weights_file=None)).to(device).eval()
    backbone = model_config.backbone
    transform, tokenize, find_spans = eval_transform(backbone), tokenizer(backbone), phrase_span_finder(backbone)
    methods = {"model": METHODS.get("context")}
    workers = config.eval.workers_for(device)

    def encode(benchmark) -> tuple[float, int]:
        started = time.perf_counter()
        result = encode_queries(
            model, methods, benchmark, transform, tokenize, device, config.eval.batch_size, workers, find_spans
        )
        return time.perf_counter() - started, len(result.grounding)

    encode(without)  # warm-up
    timings: dict[str, list[float]] = {"grounding": [], "plain": []}
    phrases = 0
    for _ in range(repeats):
        seconds, phrases = encode(split)
        timings["grounding"].append(seconds)
        timings["plain"].append(encode(without)[0])
    fastest = {name: min(values) for name, values in timings.items()}
    return {
        "queries": len(split.queries),
        "grounded_phrases": phrases,
        "with_grounding_s": fastest["grounding"],
        "with_grounding_first_s": timings["grounding"][0],  # includes finding the phrases' token spans, once
        "without_grounding_s": fastest["plain"],
        "grounding_ratio": fastest["grounding"] / fastest["plain"],
        "device": str(device),
        "backbone": backbone,
        "loader_workers": workers,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions of each variant")
    parser.add_argument("--queries", type=int, default=512, help="queries encoded per repetition")


def run(config: Any, args: argparse.Namespace) -> dict[str, Any]:
    return eval_query_benchmark(config, config.model, args.repeats, args.queries)
