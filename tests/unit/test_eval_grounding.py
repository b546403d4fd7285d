"""Grounding measures on hand-made maps whose answers are worked out by hand, their chance levels, the split by
what a noun phrase names, and the summary table."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from eval_fixtures import SYNTHETIC_KINDS, write_synthetic

from training.evaluation.benchmarks.synthetic import read_synthetic
from training.evaluation.grounding import (
    MAP_KINDS,
    MEASURES,
    PHRASE_SPLITS,
    MapScore,
    PhraseGrounding,
    format_grounding,
    metric_name,
    score_map,
    score_maps,
    split_of,
    summarise,
)

# A 4x4 grid; the box (0, 0, 0.5, 0.5) holds the centres of the top-left 2x2 patches: 4 of 16, chance 0.25.
BOX = (0.0, 0.0, 0.5, 0.5)


def test_a_map_peaked_inside_the_box_points_and_ranks_perfectly() -> None:
    peaked = np.full((4, 4), 0.01)
    peaked[0, 1] = 0.5
    peaked[:2, :2] += 0.1  # every in-box patch (0.11 or 0.6) above every out-of-box one (0.01)
    score = score_map(peaked, BOX)
    assert score.pointing == 1.0 and score.auc == 1.0
    assert score.box_share == pytest.approx((0.6 + 3 * 0.11) / (0.6 + 3 * 0.11 + 12 * 0.01))
    assert score.chance == 0.25


def test_a_uniform_map_scores_exactly_chance() -> None:
    score = score_map(np.full((4, 4), 0.0625), BOX)
    # Every patch ties for the top, so pointing is the share of tied patches inside: the chance level, as is the
    # box share of a uniform map; all ties make every in/out pair count half.
    assert score == MapScore(pointing=0.25, auc=0.5, box_share=0.25, chance=0.25)


def test_a_map_ranking_the_outside_higher_has_auc_below_half() -> None:
    inverted = np.full((4, 4), 2.0)
    inverted[:2, :2] = 1.0
    inverted[3, 3] = 5.0
    score = score_map(inverted, BOX)
    assert score.auc == 0.0 and score.pointing == 0.0
    assert score.box_share == pytest.approx(4 / (4 + 11 * 2 + 5))
    # Partly: in-box values (3, 1, 1, 1) against twelve 2s: 3 beats all 12, each 1 beats none -> 12 / 48.
    partly = inverted.copy()
    partly[3, 3] = 2.0
    partly[0, 0] = 3.0
    assert score_map(partly, BOX).auc == pytest.approx(0.25)


def test_auc_counts_ties_half_and_matches_every_pair() -> None:
    tied = np.array([[1.0, 2.0], [2.0, 0.0]])
    # Box (0, 0, 1, 0.5): in-box top row (1, 2) against bottom row (2, 0). Pairs: 1<2 -> 0, 1>0 -> 1, 2=2 -> 0.5,
    # 2>0 -> 1; 2.5 / 4.
    assert score_map(tied, (0.0, 0.0, 1.0, 0.5)).auc == pytest.approx(0.625)
    generator = np.random.default_rng(0)
    maps = generator.integers(0, 4, size=(6, 5, 7)).astype(np.float64)  # small integers: many ties
    boxes = generator.uniform(0, 1, size=(6, 4))
    boxes = np.concatenate([np.minimum(boxes[:, :2], boxes[:, 2:]), np.maximum(boxes[:, :2], boxes[:, 2:])], axis=1)
    for one_map, box, score in zip(maps, boxes, score_maps(torch.tensor(maps), torch.tensor(boxes))):
        centres_y, centres_x = (np.arange(5) + 0.5) / 5, (np.arange(7) + 0.5) / 7
        inside = ((centres_y >= box[1]) & (centres_y <= box[3]))[:, None] & (
            (centres_x >= box[0]) & (centres_x <= box[2])
        )[None, :]
        positives, negatives = one_map[inside], one_map[~inside]
        if not len(positives) or not len(negatives):
            assert score.auc is None
            continue
        pairs = (positives[:, None] > negatives[None, :]) + 0.5 * (positives[:, None] == negatives[None, :])
        assert score.auc == pytest.approx(pairs.mean())
        assert score.chance == pytest.approx(inside.mean())


def test_auc_is_undefined_when_the_box_holds_no_patch_or_every_patch() -> None:
    one_map = np.arange(16.0).reshape(4, 4)
    tiny = score_map(one_map, (0.0, 0.0, 0.1, 0.1))  # holds no centre (the first is at 0.125)
    assert tiny.auc is None and tiny.pointing == 0.0 and tiny.box_share == 0.0 and tiny.chance == 0.0
    whole = score_map(one_map, (0.0, 0.0, 1.0, 1.0))
    assert whole.auc is None and whole.pointing == 1.0 and whole.box_share == 1.0 and whole.chance == 1.0


def test_box_share_ignores_negative_scores() -> None:
    # A cosine-like map: the negative out-of-box patch carries no mass.
    assert score_map(np.array([[1.0, -1.0], [1.0, 2.0]]), (0.0, 0.0, 0.5, 1.0)).box_share == pytest.approx(0.5)
    assert score_map(-np.ones((2, 2)), (0.0, 0.0, 0.5, 0.5)).box_share == 0.0


def _scores(pointing: float, auc: float | None, share: float, chance: float) -> dict[str, MapScore]:
    return dict.fromkeys(MAP_KINDS, MapScore(pointing, auc, share, chance))


def test_summary_splits_phrases_by_what_they_name() -> None:
    phrases = [
        PhraseGrounding("present", _scores(1.0, 1.0, 0.4, 0.1)),
        PhraseGrounding("present", _scores(0.0, None, 0.0, 0.0)),  # a box without a patch centre
        PhraseGrounding("added", _scores(1.0, 0.8, 0.3, 0.2)),
        PhraseGrounding("position", _scores(0.0, 0.4, 0.1, 0.3)),
        PhraseGrounding("other", _scores(0.5, 0.5, 0.2, 0.2)),
        PhraseGrounding("something new", _scores(0.0, 0.1, 0.0, 0.2)),  # unknown kinds count as `rest`
    ]
    metrics = summarise(phrases)
    assert metrics["grounding"] == pytest.approx(0.2)  # present in-context box share, as before
    present = {measure: metrics[metric_name("context", "present", measure)] for measure in MEASURES}
    assert present == pytest.approx(
        {
            "n": 2,
            "pointing": 0.5,
            "pointing_chance": 0.05,
            "auc": 1.0,
            "auc_skipped": 1,
            "box_share": 0.2,
            "box_share_chance": 0.05,
        }
    )
    assert metrics[metric_name("isolated", "added_or_position", "n")] == 2
    assert metrics[metric_name("isolated", "added_or_position", "auc")] == pytest.approx(0.6)
    assert metrics[metric_name("tower", "rest", "n")] == 2
    assert metrics[metric_name("tower", "rest", "pointing")] == pytest.approx(0.25)
    assert set(metrics) == {"grounding"} | {
        metric_name(kind, split, measure) for kind in MAP_KINDS for split in PHRASE_SPLITS for measure in MEASURES
    }


def test_summary_reports_counts_but_no_mean_over_nothing() -> None:
    metrics = summarise([PhraseGrounding("present", _scores(1.0, None, 1.0, 1.0))])
    assert metrics[metric_name("context", "present", "auc_skipped")] == 1
    assert metric_name("context", "present", "auc") not in metrics  # every AUC undefined: no number, no NaN
    assert (
        metrics[metric_name("context", "rest", "n")] == 0
        and metrics[metric_name("context", "rest", "auc_skipped")] == 0
    )
    assert metric_name("context", "rest", "pointing") not in metrics
    assert summarise([])["grounding"] == 0.0


def test_synthetic_phrases_split_by_kind(tmp_path) -> None:
    """objects.json's `kind` reaches the summary: per query one present, two added/position and one rest phrase."""
    write_synthetic(tmp_path, sets=1)
    split = read_synthetic(tmp_path)
    kinds = [phrase.kind for query in split.queries for phrase in query.phrases]
    assert kinds == list(SYNTHETIC_KINDS) * len(split.queries)
    assert [split_of(kind) for kind in SYNTHETIC_KINDS] == ["present", "added_or_position", "added_or_position", "rest"]
    # A uniform map over the 8x8 grid of ContextTiny, scored against each phrase's own box.
    phrases = [
        PhraseGrounding(phrase.kind, dict.fromkeys(MAP_KINDS, score_map(np.ones((8, 8)), phrase.box)))
        for query in split.queries
        for phrase in query.phrases
    ]
    metrics = summarise(phrases)
    queries = len(split.queries)
    assert [metrics[metric_name("tower", split_name, "n")] for split_name in PHRASE_SPLITS] == [
        queries,
        2 * queries,
        queries,
    ]
    # The object's box (0.25..0.75) holds 4x4 of 64 patch centres; each quadrant 4x4 too.
    for split_name in PHRASE_SPLITS:
        assert metrics[metric_name("context", split_name, "box_share_chance")] == pytest.approx(0.25)
        assert metrics[metric_name("context", split_name, "box_share")] == pytest.approx(0.25)
        assert metrics[metric_name("context", split_name, "auc")] == pytest.approx(0.5)


def test_table_rows_are_map_kind_by_phrase_split() -> None:
    metrics = summarise(
        [
            PhraseGrounding("present", _scores(1.0, 0.75, 0.4, 0.1)),
            PhraseGrounding("position", _scores(0.0, None, 0.1, 0.0)),
        ]
    )
    lines = format_grounding(metrics)
    assert "pointing (chance)" in lines[0] and "AUC (skipped)" in lines[0] and "box share (chance)" in lines[0]
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:]}
    assert list(rows) == [f"{kind}/{split}" for kind in MAP_KINDS for split in PHRASE_SPLITS]
    assert rows["context/present"] == ["1", "100.00", "(10.00)", "0.750", "(0)", "40.00", "(10.00)"]
    assert rows["tower/added_or_position"] == ["1", "0.00", "(0.00)", "-", "(1)", "10.00", "(0.00)"]
    assert rows["isolated/rest"] == ["0", "-", "-", "(0)", "-"]
    assert format_grounding({"recall@1": 0.5}) == []
