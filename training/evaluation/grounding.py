"""How well a noun phrase's map over the patch grid finds its box: pointing, ROC AUC and box share, each with its
chance level, summarised per map kind and per kind of noun phrase.

A map is a (gh, gw) score per patch of the reference image's patch grid; a box is (x0, y0, x1, y1) in fractions of
the (cropped) image the grid covers. A patch is in the box when its centre is, edges included.

- pointing: 1 when the map's highest patch is in the box. Tied highest patches share the point (a flat map scores
  the share of patches in the box, not whatever the first patch happens to be). Chance: the share of patches in the
  box, what an argmax drawn uniformly at random scores.
- AUC: the ROC AUC of in-box patches against out-of-box ones: the probability that an in-box patch scores above an
  out-of-box one, ties counting half. Threshold-free, so a nearly flat map that still ranks the box first scores
  near 1. Chance: 0.5. Undefined when the box holds no patch centre or all of them; such phrases are left out of
  the mean and counted as `auc_skipped`.
- box share: the map's mass inside the box over its total mass, negative scores counting as zero. Chance: the
  share of patches in the box, what a uniform map scores. Maps are nearly flat, so this stays near the chance level
  whatever the ranking; pointing and AUC show the ranking.

Everything here is pure: maps and boxes in, numbers out, a batch of maps at a time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

MAP_KINDS = ("context", "isolated", "tower")
"""`context`: the fusion head's in-context map (`fused/np_maps`, what the model uses); `isolated`: the same with the
noun phrase encoded alone (`fused/np_maps_isolated`, the Text-CC target); `tower`: the towers' own dense map (the
noun phrase's CLIP text embedding against each projected patch token)."""
PHRASE_SPLITS = ("present", "added_or_position", "rest")
"""What a noun phrase names: an object of the reference (`present`, the headline), an object the edit adds or a grid
cell (`added_or_position`), anything else (`rest`)."""
SPLIT_OF_KIND = {"present": "present", "added": "added_or_position", "position": "added_or_position"}
"""Noun-phrase kind (objects.json `kind`) -> its split; every other kind is `rest`."""
MEASURES = ("n", "pointing", "pointing_chance", "auc", "auc_skipped", "box_share", "box_share_chance")
"""Per map kind and split; `n` and `auc_skipped` count phrases, the others are means over them."""
PREFIX = "grounding"
HEADLINE = "grounding"
"""The metric kept from before these measures: the mean in-context box share of `present` phrases."""


def split_of(kind: str) -> str:
    """The summary split a noun-phrase kind belongs to."""
    return SPLIT_OF_KIND.get(kind, "rest")


def metric_name(map_kind: str, split: str, measure: str) -> str:
    """`grounding/<map kind>/<split>/<measure>`, as the eval JSON and TensorBoard (`eval/<benchmark>/...`) name it."""
    return f"{PREFIX}/{map_kind}/{split}/{measure}"


def patches_in_boxes(grid: tuple[int, int], boxes: torch.Tensor) -> torch.Tensor:
    """(M, gh, gw) bool: the patches of a `grid` whose centres lie inside each of `boxes` (M, 4), edges included."""
    grid_h, grid_w = grid
    boxes = torch.as_tensor(boxes, dtype=torch.float64).reshape(-1, 4)
    centres_y = (torch.arange(grid_h, dtype=torch.float64) + 0.5) / grid_h
    centres_x = (torch.arange(grid_w, dtype=torch.float64) + 0.5) / grid_w
    x0, y0, x1, y1 = (boxes[:, index, None] for index in range(4))
    inside_y = (centres_y >= y0) & (centres_y <= y1)  # (M, gh)
    inside_x = (centres_x >= x0) & (centres_x <= x1)  # (M, gw)
    return inside_y[:, :, None] & inside_x[:, None, :]


def mass_share(maps: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """(M,) share of each map's mass (negative scores count as zero) in its patches `inside`; 0 without mass."""
    mass = maps.reshape(len(maps), -1).double().clamp(min=0.0)
    total = mass.sum(dim=1)
    share = (mass * inside.reshape(len(maps), -1)).sum(dim=1) / total.clamp(min=torch.finfo(torch.float64).tiny)
    return torch.where(total > 0, share, torch.zeros_like(share))


def pointing(maps: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """(M,) 1 where the highest patch is `inside`; tied highest patches share the point (the fraction inside)."""
    scores = maps.reshape(len(maps), -1).double()
    top = scores == scores.max(dim=1, keepdim=True).values
    return (top & inside.reshape(len(maps), -1)).sum(dim=1).double() / top.sum(dim=1)


def roc_auc(maps: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """(M,) P(an in-box patch scores above an out-of-box one), ties counting half; NaN where a side is empty.

    The Mann-Whitney U statistic from rank sums: a sort per map rather than every pair of patches. A patch's rank is
    the mean of the 1-based positions its value occupies in the sorted map, so tied patches share their ranks.
    """
    scores = maps.reshape(len(maps), -1).double()
    positive = inside.reshape(len(maps), -1)
    ordered = scores.sort(dim=1).values
    below = torch.searchsorted(ordered, scores, right=False)  # patches scoring less
    at_most = torch.searchsorted(ordered, scores, right=True)  # patches scoring less or the same
    ranks = (below + at_most + 1) / 2
    n_in = positive.sum(dim=1).double()
    n_out = positive.shape[1] - n_in
    rank_sum = (ranks * positive).sum(dim=1)
    auc = (rank_sum - n_in * (n_in + 1) / 2) / (n_in * n_out).clamp(min=1)
    return torch.where((n_in > 0) & (n_out > 0), auc, torch.full_like(auc, float("nan")))


@dataclass(frozen=True)
class MapScore:
    """One map of one noun phrase, scored against its box."""

    pointing: float
    auc: float | None
    """None when the box holds no patch centre or all of them."""
    box_share: float
    chance: float
    """The share of patches in the box: the chance level of both pointing and box share."""


def score_maps(maps: torch.Tensor, boxes: torch.Tensor | Sequence[Sequence[float]]) -> list[MapScore]:
    """Pointing, AUC, box share and chance of each map (M, gh, gw) against its box (M, 4), in one batched pass."""
    maps = torch.as_tensor(maps).detach().cpu().double()
    if not len(maps):
        return []
    inside = patches_in_boxes(tuple(maps.shape[1:]), torch.as_tensor(boxes, dtype=torch.float64))
    columns = (
        pointing(maps, inside).tolist(),
        roc_auc(maps, inside).tolist(),
        mass_share(maps, inside).tolist(),
        inside.reshape(len(maps), -1).double().mean(dim=1).tolist(),
    )
    return [
        MapScore(point, None if math.isnan(auc) else auc, share, chance) for point, auc, share, chance in zip(*columns)
    ]


def score_map(one_map: np.ndarray | torch.Tensor, box: Sequence[float]) -> MapScore:
    """`score_maps` of one (gh, gw) map."""
    return score_maps(torch.as_tensor(np.asarray(one_map))[None], [box])[0]


def box_share(one_map: np.ndarray | torch.Tensor, box: Sequence[float]) -> float:
    """Share of a (gh, gw) map's mass (negative scores count as zero) in the patches whose centres lie inside `box`."""
    return score_map(one_map, box).box_share


@dataclass(frozen=True)
class PhraseGrounding:
    """Every map of one grounded noun phrase, scored."""

    kind: str
    """What the phrase names (objects.json `kind`: present, added, position, other)."""
    maps: Mapping[str, MapScore]
    """Map kind (MAP_KINDS) -> its score."""


def _measures(scores: Sequence[MapScore]) -> dict[str, float | int]:
    """The MEASURES of one map kind over one split's phrases; means of an empty set are left out, not NaN."""
    aucs = [score.auc for score in scores if score.auc is not None]
    result: dict[str, float | int] = {"n": len(scores), "auc_skipped": len(scores) - len(aucs)}
    if scores:
        chance = float(np.mean([score.chance for score in scores]))
        result.update(
            pointing=float(np.mean([score.pointing for score in scores])),
            pointing_chance=chance,
            box_share=float(np.mean([score.box_share for score in scores])),
            box_share_chance=chance,
        )
    if aucs:
        result["auc"] = float(np.mean(aucs))
    return {measure: result[measure] for measure in MEASURES if measure in result}


def summarise(phrases: Sequence[PhraseGrounding]) -> dict[str, float | int]:
    """Flat `grounding/<map kind>/<split>/<measure>` metrics, plus `grounding` (present in-context box share).

    Every map kind and split reports `n` and `auc_skipped`, even when 0, so a benchmark without (say) `rest`
    phrases shows that it has none; a mean over no phrase is absent rather than a made-up number.
    """
    metrics: dict[str, float | int] = {}
    for map_kind in MAP_KINDS:
        for split in PHRASE_SPLITS:
            scores = [p.maps[map_kind] for p in phrases if split_of(p.kind) == split and map_kind in p.maps]
            metrics.update({metric_name(map_kind, split, m): v for m, v in _measures(scores).items()})
    present = [p.maps["context"].box_share for p in phrases if split_of(p.kind) == "present" and "context" in p.maps]
    return {HEADLINE: float(np.mean(present)) if present else 0.0, **metrics}


def is_grounding_measure(metric: str) -> bool:
    """True for the per-map, per-split measures (not the `grounding` headline, which reads like any metric)."""
    return metric.startswith(f"{PREFIX}/")


def format_grounding(metrics: Mapping[str, float | int], indent: str = "  ") -> list[str]:
    """Table lines, one row per map kind x split: n, pointing (chance), AUC (skipped), box share (chance).

    Pointing and box share are in percent like the retrieval metrics; AUC is a probability (0.5 = chance).
    Returns no line when `metrics` has no grounding measure.
    """
    rows = [(m, s) for m in MAP_KINDS for s in PHRASE_SPLITS if metric_name(m, s, "n") in metrics]
    if not rows:
        return []

    def cell(map_kind: str, split: str, measure: str, chance: str, percent: bool) -> str:
        value, beside = (metrics.get(metric_name(map_kind, split, name)) for name in (measure, chance))
        shown = "-" if value is None else f"{100 * value:.2f}" if percent else f"{value:.3f}"
        if beside is None:
            return shown
        return f"{shown} ({100 * beside:.2f})" if percent else f"{shown} ({int(beside)})"

    header = f"{'grounding (map/phrases)':<30}{'n':>6}{'pointing (chance)':>20}{'AUC (skipped)':>16}"
    lines = [indent + header + f"{'box share (chance)':>20}"]
    for map_kind, split in rows:
        count = int(metrics[metric_name(map_kind, split, "n")])
        lines.append(
            indent
            + f"{map_kind + '/' + split:<30}{count:>6}"
            + f"{cell(map_kind, split, 'pointing', 'pointing_chance', True):>20}"
            + f"{cell(map_kind, split, 'auc', 'auc_skipped', False):>16}"
            + f"{cell(map_kind, split, 'box_share', 'box_share_chance', True):>20}"
        )
    return lines
