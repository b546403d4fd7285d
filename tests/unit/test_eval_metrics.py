"""Retrieval metrics on hand-built rankings, with expected values worked out by hand in the comments."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.evaluation.benchmarks.fashioniq import fashioniq_text
from training.evaluation.encode import box_in_crop
from training.evaluation.grounding import box_share
from training.evaluation.metrics import (
    NO_INDEX,
    average_precision_at_k,
    map_at_k,
    rank_gallery,
    rank_subsets,
    recall_at_k,
    subset_recall_at_k,
)

# Gallery embeddings are the identity, so a query embedding *is* its row of scores over the 6 gallery images.
GALLERY = torch.eye(6)
SCORES = torch.tensor(
    [
        [0.90, 0.80, 0.10, 0.20, 0.30, 0.40],  # reference 0 scores highest; target 1 is next
        [0.50, 0.60, 0.95, 0.10, 0.70, 0.20],  # reference 2 first; target 3 is last of the rest
        [0.30, 0.90, 0.80, 0.70, 0.10, 1.00],  # reference 5 first; target 0 fourth of the rest
    ]
)
REFERENCES = np.array([0, 2, 5])
TARGETS = np.array([1, 3, 0])


def test_cirr_recall_removes_the_reference() -> None:
    rankings = rank_gallery(SCORES, GALLERY, top_k=50, exclude=REFERENCES)
    # Without each reference: q0 -> [1,5,4,3,2] (target at 1), q1 -> [4,1,0,5,3] (at 5), q2 -> [1,2,3,0,4] (at 4).
    assert rankings[:, :5].tolist() == [[1, 5, 4, 3, 2], [4, 1, 0, 5, 3], [1, 2, 3, 0, 4]]
    assert rankings[:, 5].tolist() == [NO_INDEX] * 3  # the removed reference never comes back as a prediction
    assert recall_at_k(rankings, TARGETS, (1, 2, 4, 5)) == {
        "recall@1": pytest.approx(1 / 3),
        "recall@2": pytest.approx(1 / 3),
        "recall@4": pytest.approx(2 / 3),
        "recall@5": pytest.approx(1.0),
    }
    # Keeping the reference pushes every target one place down: q0's target falls to 2nd, so R@1 drops to 0.
    kept = rank_gallery(SCORES, GALLERY, top_k=50)
    assert recall_at_k(kept, TARGETS, (1, 2))["recall@1"] == 0.0
    assert recall_at_k(kept, TARGETS, (1, 2))["recall@2"] == pytest.approx(1 / 3)


def test_rank_gallery_chunks_agree_with_one_pass() -> None:
    generator = torch.Generator().manual_seed(0)
    queries, gallery = torch.randn(7, 4, generator=generator), torch.randn(20, 4, generator=generator)
    exclude = np.array([0, NO_INDEX, 3, 3, 19, NO_INDEX, 5])
    one_pass = rank_gallery(queries, gallery, 10, exclude, chunk_size=100)
    chunked = rank_gallery(queries, gallery, 10, exclude, chunk_size=3)
    assert (one_pass == chunked).all()
    assert not any(exclude[row] in one_pass[row] for row in range(7) if exclude[row] != NO_INDEX)


def test_cirr_subset_recall_within_members_minus_reference() -> None:
    members = [[0, 1, 2, 3], [2, 3, 4, 5], [5, 0, 1, 4]]
    rankings = rank_subsets(SCORES, GALLERY, members, REFERENCES)
    # q0: {1: .8, 2: .1, 3: .2} -> [1,3,2], target 1 first; q1: {3: .1, 4: .7, 5: .2} -> [4,5,3], target 3 third;
    # q2: {0: .3, 1: .9, 4: .1} -> [1,0,4], target 0 second.
    assert rankings.tolist() == [[1, 3, 2], [4, 5, 3], [1, 0, 4]]
    assert subset_recall_at_k(rankings, TARGETS, (1, 2, 3)) == {
        "recall_subset@1": pytest.approx(1 / 3),
        "recall_subset@2": pytest.approx(2 / 3),
        "recall_subset@3": pytest.approx(1.0),
    }


def test_circo_average_precision_several_ground_truths() -> None:
    ranking = [10, 1, 11, 2, 12, 3, 4, 5, 13, 6]
    ground_truth = [10, 11, 12, 13]  # relevant at positions 1, 3, 5, 9: P@i = 1, 2/3, 3/5, 4/9
    # K=3 < |GT|=4: (1 + 2/3) / 3
    assert average_precision_at_k(ranking, ground_truth, 3) == pytest.approx((1 + 2 / 3) / 3)
    # K=5 > |GT|: (1 + 2/3 + 3/5) / 4
    assert average_precision_at_k(ranking, ground_truth, 5) == pytest.approx((1 + 2 / 3 + 3 / 5) / 4)
    # K=10: all four found: (1 + 2/3 + 3/5 + 4/9) / 4 = 0.677777...
    assert average_precision_at_k(ranking, ground_truth, 10) == pytest.approx(0.6777777778)
    # A single ground truth at position 2 with K=5 > |GT|=1: P@2 / 1 = 0.5.
    single = [1, 7, 2, 3, 4, 5, 6, 8, 9, 10]
    assert average_precision_at_k(single, [7], 5) == pytest.approx(0.5)
    found = map_at_k(np.array([ranking, single]), [ground_truth, [7]], (5, 10))
    assert found["map@5"] == pytest.approx(((1 + 2 / 3 + 3 / 5) / 4 + 0.5) / 2)
    assert found["map@10"] == pytest.approx((0.6777777778 + 0.5) / 2)
    # A ground truth outside the top K adds nothing: AP@1 of `single` is 0.
    assert average_precision_at_k(single, [7], 1) == 0.0


def test_patterncir_recall_at_20() -> None:
    # Two queries over a 30-wide ranking: one target at position 20, the other at 21.
    rankings = np.tile(np.arange(30), (2, 1))
    targets = np.array([19, 20])
    found = recall_at_k(rankings, targets, (1, 5, 10, 20, 50))
    assert found == {"recall@1": 0.0, "recall@5": 0.0, "recall@10": 0.0, "recall@20": 0.5, "recall@50": 1.0}


def test_fashioniq_text_joining() -> None:
    assert fashioniq_text(["is blue and longer.", "has short sleeves?"]) == "Is blue and longer and has short sleeves"
    # capitalize() lowercases the rest of the first caption; the second keeps its case, only its edges are stripped.
    assert fashioniq_text([" Is RED, ", "More fitted. "]) == "Is red and More fitted"
    with pytest.raises(ValueError):
        fashioniq_text(["only one"])


def test_grounding_share_and_crop_mapping() -> None:
    attention = np.array([[1.0, 0.0], [0.0, 3.0]])
    # Only the top-left patch centre (0.25, 0.25) lies inside the box: 1 / 4 of the mass.
    assert box_share(attention, (0.0, 0.0, 0.5, 0.5)) == pytest.approx(0.25)
    assert box_share(attention, (0.0, 0.0, 1.0, 1.0)) == pytest.approx(1.0)
    assert box_share(np.zeros((2, 2)), (0.0, 0.0, 1.0, 1.0)) == 0.0
    # A 200x100 image keeps its middle 100x100 square: x 0.25..0.75 (pixels 50..150) covers the whole crop.
    assert box_in_crop((0.25, 0.2, 0.75, 0.6), 200, 100) == pytest.approx((0.0, 0.2, 1.0, 0.6))
    assert box_in_crop((0.0, 0.0, 0.2, 0.2), 200, 100) == pytest.approx((0.0, 0.0, 0.0, 0.2))
