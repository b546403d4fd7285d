"""Retrieval metrics on rankings: recall@K (whole gallery), subset recall@K, CIRCO AP@K / mAP@K, and the share of
queries whose target outscores their hard negatives.

Everything here is pure: embeddings or score matrices in, gallery indices out, numbers out. Rankings are
(Q, K) arrays of gallery indices, best first, padded with -1 where a query has fewer candidates than K.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

NO_INDEX = -1
"""Padding in rankings and the `exclude` marker for queries whose reference is not removed."""


def rank_gallery(
    query_embeddings: torch.Tensor,
    gallery_embeddings: torch.Tensor,
    top_k: int,
    exclude: Sequence[int] | np.ndarray | None = None,
    chunk_size: int = 1024,
) -> np.ndarray:
    """Rank the whole gallery for every query by dot product, best first.

    Args:
        query_embeddings: (Q, D) embeddings (normalised, so the dot product is the cosine).
        gallery_embeddings: (N, D) embeddings on the same device.
        top_k: how many indices to keep per query; capped at the gallery size.
        exclude: per query, a gallery index that must never be returned (the reference image under CIRR's
            protocol), or NO_INDEX; None excludes nothing.
        chunk_size: queries scored at once, so a 120k-image gallery never needs a (Q, N) matrix in memory.

    Returns:
        (Q, min(top_k, N)) int64 gallery indices; a query that lost its reference to `exclude` on a gallery
        no larger than top_k gets NO_INDEX in the last column.
    """
    num_gallery = gallery_embeddings.shape[0]
    keep = min(top_k, num_gallery)
    exclude_tensor = None
    if exclude is not None:
        exclude_tensor = torch.as_tensor(np.asarray(exclude, dtype=np.int64), device=query_embeddings.device)
    rankings = []
    for start in range(0, query_embeddings.shape[0], chunk_size):
        scores = query_embeddings[start : start + chunk_size].float() @ gallery_embeddings.float().T
        if exclude_tensor is not None:
            rows = exclude_tensor[start : start + chunk_size]
            valid = rows >= 0
            scores[torch.nonzero(valid).squeeze(1), rows[valid]] = float("-inf")
        values, indices = torch.topk(scores, keep, dim=1)
        indices = indices.masked_fill(values == float("-inf"), NO_INDEX)
        rankings.append(indices.cpu())
    if not rankings:
        return np.zeros((0, keep), dtype=np.int64)
    return torch.cat(rankings).numpy().astype(np.int64)


def rank_subsets(
    query_embeddings: torch.Tensor,
    gallery_embeddings: torch.Tensor,
    members: Sequence[Sequence[int]],
    exclude: Sequence[int] | np.ndarray | None = None,
) -> np.ndarray:
    """Rank each query's own candidate set (CIRR's `img_set.members`), best first, the reference removed.

    Args:
        query_embeddings: (Q, D).
        gallery_embeddings: (N, D).
        members: per query, gallery indices of its candidate set.
        exclude: per query, the gallery index to drop from its set (the reference), or NO_INDEX.

    Returns:
        (Q, S) int64 gallery indices, S = the largest candidate set after removal, padded with NO_INDEX.
    """
    candidate_lists = []
    for row, member_indices in enumerate(members):
        dropped = int(exclude[row]) if exclude is not None else NO_INDEX
        # dict.fromkeys keeps order and drops repeated members, so a listed-twice image is one candidate.
        candidate_lists.append([index for index in dict.fromkeys(member_indices) if index != dropped])
    width = max((len(candidates) for candidates in candidate_lists), default=0)
    rankings = np.full((len(candidate_lists), width), NO_INDEX, dtype=np.int64)
    for row, candidates in enumerate(candidate_lists):
        if not candidates:
            continue
        index_tensor = torch.as_tensor(candidates, device=gallery_embeddings.device)
        scores = gallery_embeddings[index_tensor].float() @ query_embeddings[row].float()
        # A stable sort keeps the listed order among equal scores, so ties are deterministic.
        order = torch.sort(scores, descending=True, stable=True).indices.cpu().numpy()
        rankings[row, : len(candidates)] = np.asarray(candidates, dtype=np.int64)[order]
    return rankings


def recall_at_k(
    rankings: np.ndarray, targets: Sequence[int] | np.ndarray, ks: Sequence[int], prefix: str = "recall"
) -> dict[str, float]:
    """Share of queries whose target is among the first K of their ranking.

    Args:
        rankings: (Q, K_max) gallery indices, best first.
        targets: (Q,) the target's gallery index per query.
        ks: cut-offs; a K beyond the ranking's width counts the whole ranking.
        prefix: metric name prefix (`recall` or `recall_subset`).

    Returns:
        `{f"{prefix}@{K}": fraction in [0, 1]}`.
    """
    rankings = np.asarray(rankings)
    targets = np.asarray(targets, dtype=np.int64)
    if rankings.shape[0] != targets.shape[0]:
        raise ValueError(f"{rankings.shape[0]} rankings but {targets.shape[0]} targets")
    if rankings.shape[0] == 0:
        return {f"{prefix}@{k}": 0.0 for k in ks}
    hits = rankings == targets[:, None]
    return {f"{prefix}@{k}": float(hits[:, :k].any(axis=1).mean()) for k in ks}


def subset_recall_at_k(
    subset_rankings: np.ndarray, targets: Sequence[int] | np.ndarray, ks: Sequence[int]
) -> dict[str, float]:
    """CIRR's Recall_subset@K: recall within each query's candidate set (reference already removed)."""
    return recall_at_k(subset_rankings, targets, ks, prefix="recall_subset")


def target_above_hard_negative(
    query_embeddings: torch.Tensor,
    gallery_embeddings: torch.Tensor,
    targets: Sequence[int] | np.ndarray,
    hard_negatives: Sequence[Sequence[int]],
) -> float:
    """Share of queries whose target scores above their hard negative: 0.5 is chance, whatever else the gallery holds.

    A query with several hard negatives counts the share of them its target beats; an exact tie counts half.
    Queries without a hard negative are left out (0.0 when none has one).

    Args:
        query_embeddings: (Q, D) normalised.
        gallery_embeddings: (N, D) normalised, on the same device.
        targets: (Q,) the target's gallery index per query.
        hard_negatives: per query, gallery indices of its hard negatives.
    """
    rows = [row for row, negatives in enumerate(hard_negatives) if negatives]
    if not rows:
        return 0.0
    device = gallery_embeddings.device
    wins = []
    for row in rows:
        query = query_embeddings[row].float()
        target_score = gallery_embeddings[int(targets[row])].float() @ query
        negative_scores = gallery_embeddings[torch.as_tensor(list(hard_negatives[row]), device=device)].float() @ query
        beaten = (target_score > negative_scores).float() + 0.5 * (target_score == negative_scores).float()
        wins.append(float(beaten.mean()))
    return float(np.mean(wins))


def average_precision_at_k(ranking: Sequence[int], ground_truth: Sequence[int], k: int) -> float:
    """CIRCO's AP@K = (1 / min(K, |GT|)) * sum_{i <= K} P@i * rel(i) for one query.

    Args:
        ranking: gallery indices, best first (at least K of them, or all there are).
        ground_truth: the query's relevant gallery indices (duplicates count once).
        k: cut-off.
    """
    relevant = {int(index) for index in ground_truth}
    if not relevant:
        raise ValueError("AP@K needs at least one ground-truth image")
    hits = 0
    total = 0.0
    for position, index in enumerate(list(ranking)[:k], start=1):
        if int(index) in relevant:
            hits += 1
            total += hits / position  # P@i at a relevant position; non-relevant positions add 0
    return total / min(k, len(relevant))


def map_at_k(rankings: np.ndarray, ground_truths: Sequence[Sequence[int]], ks: Sequence[int]) -> dict[str, float]:
    """Mean of AP@K over queries, `{f"map@{K}": fraction}`."""
    if len(rankings) != len(ground_truths):
        raise ValueError(f"{len(rankings)} rankings but {len(ground_truths)} ground-truth lists")
    if len(rankings) == 0:
        return {f"map@{k}": 0.0 for k in ks}
    return {
        f"map@{k}": float(np.mean([average_precision_at_k(r, gt, k) for r, gt in zip(rankings, ground_truths)]))
        for k in ks
    }
