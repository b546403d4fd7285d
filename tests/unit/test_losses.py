"""Contrastive and Text-CC losses on hand-computed cases (single process; tests/e2e/test_contrastive_distributed.py
covers the gathered version)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from training.objectives.concept_consistency import concept_consistency_loss
from training.objectives.contrastive import ContrastiveLoss

TAU = 0.07


def _unit(*angles: float) -> torch.Tensor:
    return torch.tensor([[math.cos(a), math.sin(a)] for a in angles])


def _cross_entropy(rows: list[list[float]], labels: list[int]) -> float:
    """Mean over rows of -log softmax(row)[label], by hand."""
    total = 0.0
    for row, label in zip(rows, labels):
        total += -row[label] + math.log(sum(math.exp(value) for value in row))
    return total / len(rows)


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a[0] * b[0] + a[1] * b[1])


QUERY, TARGET, REFERENCE = _unit(0.0, 1.0, 2.5), _unit(0.2, 1.3, 2.0), _unit(-0.4, 0.9, 3.0)


@pytest.mark.parametrize(("reference_negatives", "symmetric"), [(True, True), (True, False), (False, True)])
def test_contrastive_loss_equals_hand_computed_3x3(reference_negatives, symmetric):
    forward_rows = []
    for i in range(3):
        row = [_dot(QUERY[i], TARGET[j]) / TAU for j in range(3)]
        if reference_negatives:
            row += [_dot(QUERY[i], REFERENCE[j]) / TAU for j in range(3)]
        forward_rows.append(row)
    expected = _cross_entropy(forward_rows, [0, 1, 2])
    if symmetric:
        backward_rows = [[_dot(TARGET[i], QUERY[j]) / TAU for j in range(3)] for i in range(3)]
        expected = (expected + _cross_entropy(backward_rows, [0, 1, 2])) / 2

    loss = ContrastiveLoss(TAU, reference_negatives, symmetric)(QUERY, TARGET, REFERENCE)
    assert loss["loss"].item() == pytest.approx(expected, rel=1e-5)
    best = [max(range(len(row)), key=row.__getitem__) for row in forward_rows]
    assert loss["accuracy"].item() == pytest.approx(sum(b == i for i, b in enumerate(best)) / 3)


def test_reference_equal_to_target_is_still_only_a_negative():
    # With r_i == t_i, a loss that counted the reference as a second positive would be unchanged by adding the
    # references; with references as negatives only, each row's denominator doubles: exactly + log 2.
    without = ContrastiveLoss(TAU, reference_negatives=False, symmetric=False)(QUERY, TARGET)["loss"]
    duplicated = ContrastiveLoss(TAU, reference_negatives=True, symmetric=False)(QUERY, TARGET, TARGET.clone())
    assert duplicated["loss"].item() == pytest.approx(without.item() + math.log(2), rel=1e-6)
    assert duplicated["accuracy"].item() == 1.0  # ties resolve to the target column, the only label

    reference = TARGET.clone().requires_grad_(True)
    target = TARGET.clone().requires_grad_(True)
    ContrastiveLoss(TAU, True, False)(QUERY, target, reference)["loss"].backward()
    # Pulled towards its query as a positive, pushed away as a negative: the two gradients differ in sign.
    own = (QUERY * target.grad).sum(dim=1)
    own_reference = (QUERY * reference.grad).sum(dim=1)
    assert torch.all(own < 0) and torch.all(own_reference > 0)


def test_contrastive_gradient_matches_autograd_of_plain_formula():
    query = F.normalize(torch.randn(5, 8), dim=-1).requires_grad_(True)
    target = F.normalize(torch.randn(5, 8), dim=-1).requires_grad_(True)
    reference = F.normalize(torch.randn(5, 8), dim=-1)
    ContrastiveLoss(TAU)(query, target, reference)["loss"].backward()
    q, t = query.detach().clone().requires_grad_(True), target.detach().clone().requires_grad_(True)
    labels = torch.arange(5)
    forward = F.cross_entropy(q @ torch.cat([t, reference]).T / TAU, labels)
    backward = F.cross_entropy(t @ q.T / TAU, labels)
    ((forward + backward) / 2).backward()
    torch.testing.assert_close(query.grad, q.grad)
    torch.testing.assert_close(target.grad, t.grad)


def test_concept_consistency_loss_hand_computed():
    in_context = torch.tensor([[[0.50, 0.10, 0.30], [0.2, 0.2, 0.2]], [[0.9, 0.0, 0.0], [0.0, 0.0, 0.0]]])
    isolated = torch.tensor([[[0.40, 0.12, 0.00], [0.9, 0.9, 0.9]], [[0.0, 0.0, 0.7], [0.0, 0.0, 0.0]]])
    mask = torch.tensor([[True, False], [True, False]])
    epsilon = 0.05
    # NP (0,0): |d| = .10 .02 .30 -> relu(-eps) = .05 0 .25 -> mean .1; NP (1,0): .9 0 .7 -> .85 0 .65 -> .5
    expected = (0.1 + 0.5) / 2
    loss = concept_consistency_loss(in_context.requires_grad_(True), isolated, mask, epsilon)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert torch.all(in_context.grad[~mask] == 0)  # masked slots neither count nor get gradient
    assert in_context.grad[0, 0].tolist() == pytest.approx([1 / 6, 0.0, 1 / 6])


def test_concept_consistency_loss_without_noun_phrases_is_zero_and_differentiable():
    in_context = torch.rand(3, 4, 5, requires_grad=True)
    loss = concept_consistency_loss(in_context, torch.rand(3, 4, 5), torch.zeros(3, 4, dtype=torch.bool), 0.05)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(in_context.grad == 0)
    empty = concept_consistency_loss(
        torch.zeros(2, 0, 5), torch.zeros(2, 0, 5), torch.zeros(2, 0, dtype=torch.bool), 0.05
    )
    assert empty.item() == 0.0
