"""Score one benchmark split: encode, rank for the checkpoint's method and its baselines, apply the protocol.

Each method is a registered `training.evaluation.methods` plug-in; results name the checkpoint's own method
`model` and every baseline by its registered name.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from training.evaluation.benchmarks.base import BenchmarkSplit
from training.evaluation.encode import SpanFinder, encode_gallery, encode_queries
from training.evaluation.grounding import summarise
from training.evaluation.methods.base import Method, MethodContext
from training.evaluation.metrics import (
    NO_INDEX,
    map_at_k,
    rank_gallery,
    rank_subsets,
    recall_at_k,
    subset_recall_at_k,
    target_above_hard_negative,
)

logger = logging.getLogger(__name__)

MODEL = "model"
"""The result name of the checkpoint's own method (its metrics are `metrics`, the others `baselines`)."""


@dataclass
class EncodeSettings:
    """What to score and how to run the encoders: methods, the backbone's transform and tokenizer, device, batch."""

    methods: dict[str, Method]
    """Result name -> method: `model` (the checkpoint's method) first, then the baselines."""
    transform: Callable
    tokenize: Callable[[list[str]], torch.Tensor]
    device: torch.device
    batch_size: int = 128
    workers: int = 2
    top_k: int = 50
    find_spans: SpanFinder | None = None
    config: Any = None
    """The eval job's root config, which methods with their own networks or texts read (`MethodContext`)."""
    backbone: str | None = None
    """The backbone `transform` belongs to (methods with their own towers check theirs against it)."""


@dataclass
class SplitScores:
    """Everything one split yields; unlabelled splits have rankings but no metrics."""

    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    """method (`model` or a baseline) -> metric -> fraction (the grounding measures' `n` and `auc_skipped` count)."""
    predictions: dict[str, list[str]] = field(default_factory=dict)
    """query id -> the model's top-k gallery names (reference removed where the protocol removes it)."""
    subset_predictions: dict[str, list[str]] = field(default_factory=dict)
    """query id -> the model's ranking of its candidate set minus the reference (CIRR-style splits)."""
    method_predictions: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    """method (every one but `model`) -> query id -> its top-k gallery names."""
    details: dict[str, Any] = field(default_factory=dict)


def _names(ranking: np.ndarray, gallery: list[str]) -> list[str]:
    return [gallery[index] for index in ranking if index != NO_INDEX]


def score_split(model: torch.nn.Module, split: BenchmarkSplit, settings: EncodeSettings) -> SplitScores:
    """Encode a split's gallery and queries and score the model and every baseline under its protocol."""
    protocol = split.protocol
    index_of = split.gallery_index()
    for method in settings.methods.values():
        method.prepare(MethodContext(settings.config, settings.device, split, settings.backbone))
    gallery_paths = [split.image_paths[name] for name in split.gallery]
    gallery = encode_gallery(
        model,
        settings.methods,
        gallery_paths,
        settings.transform,
        settings.device,
        settings.batch_size,
        settings.workers,
        desc=f"{split.name} gallery",
        names=split.gallery,
    )
    queries = encode_queries(
        model,
        settings.methods,
        split,
        settings.transform,
        settings.tokenize,
        settings.device,
        settings.batch_size,
        settings.workers,
        settings.find_spans,
    )
    pairs = {
        name: (queries.embeddings[name], gallery[method.gallery_space(model)])
        for name, method in settings.methods.items()
    }
    references = np.array([index_of.get(query.reference, NO_INDEX) for query in split.queries], dtype=np.int64)
    exclude = references if protocol.remove_reference else None
    depth = max((settings.top_k, *protocol.recall_ks, *protocol.map_ks))
    members = [[index_of[name] for name in query.subset] for query in split.queries] if protocol.subset_ks else []
    labelled = split.labelled
    targets = np.array([index_of[query.target] for query in split.queries], dtype=np.int64) if labelled else None
    negatives = [[index_of[name] for name in query.hard_negatives] for query in split.queries]
    scores = SplitScores()
    for method, (query_embeddings, gallery_embeddings) in pairs.items():
        query_embeddings = query_embeddings.to(settings.device)
        gallery_embeddings = gallery_embeddings.to(settings.device)
        rankings = rank_gallery(query_embeddings, gallery_embeddings, depth, exclude)
        subset_rankings = rank_subsets(query_embeddings, gallery_embeddings, members, references) if members else None
        top = {
            query.query_id: _names(ranking[: settings.top_k], split.gallery)
            for query, ranking in zip(split.queries, rankings)
        }
        if method != MODEL:
            scores.method_predictions[method] = top
        else:
            scores.predictions = top
            if subset_rankings is not None:
                scores.subset_predictions = {
                    query.query_id: _names(ranking, split.gallery)
                    for query, ranking in zip(split.queries, subset_rankings)
                }
        if not labelled:
            continue
        metrics = recall_at_k(rankings, targets, protocol.recall_ks)
        if subset_rankings is not None:
            metrics.update(subset_recall_at_k(subset_rankings, targets, protocol.subset_ks))
        if protocol.map_ks:
            ground_truths = [[index_of[name] for name in query.ground_truth] for query in split.queries]
            metrics.update(map_at_k(rankings, ground_truths, protocol.map_ks))
        if protocol.average:
            metrics["avg"] = float(np.mean([metrics[name] for name in protocol.average]))
        if protocol.hard_negatives:
            metrics["target_above_hard_negative"] = target_above_hard_negative(
                query_embeddings, gallery_embeddings, targets, negatives
            )
        scores.metrics[method] = metrics
    if labelled and protocol.grounding:
        scored = queries.grounding
        scores.metrics[MODEL].update(summarise(scored))
        scores.details.update(grounding_phrases=len(scored), grounding_phrases_dropped=queries.phrases_dropped)
        if not scored:
            logger.warning("%s: no grounded phrase could be scored; grounding reported as 0", split.name)
    return scores


def combine_parts(parts: dict[str, SplitScores]) -> SplitScores:
    """Merge the per-category scores of a multi-part benchmark (FashionIQ).

    Each metric appears as `<part>/<metric>` and, averaged over the parts, under its own name (the averages the
    benchmark reports); an `avg` over the averaged recall@K values is added. Prediction keys become `<part>/<id>`.
    """
    if len(parts) == 1:
        return next(iter(parts.values()))
    combined = SplitScores()
    methods = list(next(iter(parts.values())).metrics)
    for method in methods:
        merged: dict[str, float] = {}
        for part, scores in parts.items():
            merged.update({f"{part}/{name}": value for name, value in scores.metrics[method].items()})
        names = list(next(iter(parts.values())).metrics[method])
        for name in names:
            merged[name] = float(np.mean([scores.metrics[method][name] for scores in parts.values()]))
        recalls = [merged[name] for name in names if name.startswith("recall@")]
        if recalls and "avg" not in merged:
            merged["avg"] = float(np.mean(recalls))
        combined.metrics[method] = merged
    for part, scores in parts.items():
        _add_records(combined, part, scores)
    return combined


def add_diagnostic(scores: SplitScores, prefix: str, diagnostic: SplitScores) -> SplitScores:
    """Add a diagnostic split's scores to a benchmark's own under `<prefix>/`: metrics (every method that has
    them), predictions and details; nothing is averaged with the main split's. Returns `scores`, updated."""
    for method, metrics in diagnostic.metrics.items():
        scores.metrics.setdefault(method, {}).update({f"{prefix}/{name}": value for name, value in metrics.items()})
    _add_records(scores, prefix, diagnostic)
    return scores


def _add_records(scores: SplitScores, prefix: str, other: SplitScores) -> None:
    """Add `other`'s predictions (the model's and each method's) under `<prefix>/<id>`, and its details as `prefix`."""
    scores.predictions.update({f"{prefix}/{key}": ranked for key, ranked in other.predictions.items()})
    for method, predictions in other.method_predictions.items():
        scores.method_predictions.setdefault(method, {}).update(
            {f"{prefix}/{key}": ranked for key, ranked in predictions.items()}
        )
    scores.details[prefix] = other.details
