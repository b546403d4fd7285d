"""The concept-consistency departures: the `spatial` form, the `towers` target and grounding preservation.

Each loss on hand-made maps (value, the direction its gradient moves mass, padding, no phrase at all), then the
objective on the tiny model with starting towers read from a weights file the test writes.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from cc_oracle import make_batch
from safetensors.torch import save_file

from cluster.root_config import load_config
from training.model.config import ModelConfig
from training.model.towers import build_backbone
from training.objectives.concept_consistency import (
    at_context_mass,
    concept_consistency_loss,
    grounding_preservation_loss,
    over_patches,
    spatial_consistency_loss,
)
from training.objectives.config import LossConfig
from training.objectives.context_cir import ConTextObjective

TINY = ModelConfig(backbone="ContextTiny", fusion_layers=2, fusion_heads=4)


def _one_phrase(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).reshape(1, 1, -1)


MASK = torch.ones(1, 1, dtype=torch.bool)


def _sgd_step(loss_of, maps: torch.Tensor, lr: float = 0.01) -> torch.Tensor:
    """`maps` after one gradient-descent step on `loss_of(maps)` (kept non-negative)."""
    maps = maps.clone().requires_grad_(True)
    loss_of(maps).backward()
    return (maps - lr * maps.grad).clamp(min=0).detach()


# --- spatial form -------------------------------------------------------------------------------------------------


def test_spatial_loss_is_kl_of_the_target_against_the_normalised_map():
    context = _one_phrase([1.0, 1.0, 2.0])  # over patches: 0.25, 0.25, 0.5
    target = _one_phrase([0.0, 0.0, 1.0])
    assert spatial_consistency_loss(context, target, MASK).item() == pytest.approx(math.log(2.0))
    target = _one_phrase([0.5, 0.25, 0.25])
    expected = 0.5 * math.log(0.5 / 0.25) + 0.25 * math.log(0.25 / 0.25) + 0.25 * math.log(0.25 / 0.5)
    assert spatial_consistency_loss(context, target, MASK).item() == pytest.approx(expected)
    # Only the shape counts: a map ten times lower costs the same, and a map equal in shape costs nothing.
    assert spatial_consistency_loss(context / 10, target, MASK).item() == pytest.approx(expected)
    assert spatial_consistency_loss(_one_phrase([2.0, 1.0, 1.0]), target, MASK).item() == pytest.approx(0.0, abs=1e-6)


def test_spatial_gradient_moves_mass_towards_the_targets_peak():
    context = _one_phrase([0.2, 0.2, 0.2, 0.2])
    target = _one_phrase([0.05, 0.05, 0.85, 0.05])
    maps = context.clone().requires_grad_(True)
    spatial_consistency_loss(maps, target, MASK).backward()
    assert maps.grad[0, 0, 2] < 0 and (maps.grad[0, 0, [0, 1, 3]] > 0).all()
    stepped = _sgd_step(lambda m: spatial_consistency_loss(m, target, MASK), context)
    assert over_patches(stepped)[0, 0, 2] > over_patches(context)[0, 0, 2]
    # Unlike the paper's L1 below a lower target, the total attention is not what it moves.
    below = _one_phrase([0.02, 0.02, 0.1, 0.02])
    lifted = _sgd_step(lambda m: concept_consistency_loss(m, below, MASK, 0.0), context, lr=0.1)
    assert lifted.sum() < context.sum() and (lifted < context).all()  # L1: every patch falls alike


def test_spatial_loss_ignores_padding_and_gives_zero_without_phrases():
    context = torch.rand(2, 3, 5) + 0.1
    target = over_patches(torch.rand(2, 3, 5))
    mask = torch.tensor([[True, True, False], [True, False, False]])
    value = spatial_consistency_loss(context, target, mask)
    garbage_context, garbage_target = context.clone(), target.clone()
    garbage_context[~mask] = 0.0  # a padding row of zeros, as the model gives
    garbage_target[~mask] = torch.tensor([1.0, 0, 0, 0, 0])
    torch.testing.assert_close(spatial_consistency_loss(garbage_context, garbage_target, mask), value)
    maps = garbage_context.clone().requires_grad_(True)
    spatial_consistency_loss(maps, garbage_target, mask).backward()
    assert torch.isfinite(maps.grad).all() and (maps.grad[~mask] == 0).all()

    empty = torch.zeros(2, 3, dtype=torch.bool)
    maps = torch.zeros(2, 3, 5, requires_grad=True)
    loss = spatial_consistency_loss(maps, torch.zeros(2, 3, 5), empty)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert (maps.grad == 0).all()


# --- towers target under the l1 form -------------------------------------------------------------------------------


def test_towers_target_at_context_mass_gives_an_l1_about_where_not_how_much():
    context = _one_phrase([0.1, 0.1, 0.1, 0.1])  # mass 0.4
    distribution = _one_phrase([0.7, 0.1, 0.1, 0.1])
    target = at_context_mass(distribution, context)
    torch.testing.assert_close(target, _one_phrase([0.28, 0.04, 0.04, 0.04]))
    assert concept_consistency_loss(context, target, MASK, 0.0).item() == pytest.approx((0.18 + 3 * 0.06) / 4)
    assert concept_consistency_loss(context, target, MASK, 0.1).item() == pytest.approx(0.08 / 4)
    stepped = _sgd_step(lambda m: concept_consistency_loss(m, at_context_mass(distribution, m), MASK, 0.0), context)
    assert over_patches(stepped)[0, 0, 0] > 0.25
    assert stepped[0, 0, 0] > 0.1 and (stepped[0, 0, 1:] < 0.1).all()  # the peak up, the rest down

    # Padding rows and an empty batch, as for the paper's form.
    maps = torch.zeros(1, 2, 4, requires_grad=True)
    mask = torch.tensor([[False, False]])
    loss = concept_consistency_loss(maps, at_context_mass(torch.full((1, 2, 4), 0.25), maps), mask, 0.0)
    assert loss.item() == 0.0
    loss.backward()
    assert (maps.grad == 0).all()


# --- grounding preservation -----------------------------------------------------------------------------------------


def test_grounding_preservation_is_kl_between_tower_softmaxes():
    starting = _one_phrase([1.0, 0.0, 0.0])
    assert grounding_preservation_loss(starting, starting, MASK, 0.1).item() == pytest.approx(0.0, abs=1e-7)
    uniform = _one_phrase([0.3, 0.3, 0.3])
    teacher = torch.softmax(starting / 0.5, dim=-1)[0, 0]
    expected = sum(p * math.log(p * 3) for p in teacher.tolist())
    assert grounding_preservation_loss(uniform, starting, MASK, 0.5).item() == pytest.approx(expected, rel=1e-5)
    cosines = uniform.clone().requires_grad_(True)
    grounding_preservation_loss(cosines, starting, MASK, 0.5).backward()
    assert cosines.grad[0, 0, 0] < 0 and (cosines.grad[0, 0, 1:] > 0).all()  # descent raises the starting peak

    batch_cosines = torch.randn(2, 3, 4, requires_grad=True)
    mask = torch.tensor([[True, False, False], [False, False, False]])
    value = grounding_preservation_loss(batch_cosines, torch.randn(2, 3, 4), mask, 0.1)
    value.backward()
    assert (batch_cosines.grad[~mask] == 0).all() and torch.isfinite(batch_cosines.grad).all()
    none = grounding_preservation_loss(batch_cosines, torch.randn(2, 3, 4), torch.zeros(2, 3, dtype=bool), 0.1)
    assert none.item() == 0.0 and none.requires_grad


# --- the objective ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tower_weights(tmp_path_factory):
    """A local open_clip weights file of random ContextTiny towers: the run's starting towers."""
    torch.manual_seed(7)
    clip = build_backbone(ModelConfig(backbone="ContextTiny")).clip
    path = tmp_path_factory.mktemp("towers") / "towers.safetensors"
    save_file({name: tensor.contiguous() for name, tensor in clip.state_dict().items()}, str(path))
    return str(path)


def _objective(weights: str, **loss) -> ConTextObjective:
    torch.manual_seed(0)
    return ConTextObjective(dataclasses.replace(TINY, weights_file=weights), LossConfig(**loss))


def test_towers_target_reads_the_frozen_starting_towers_and_skips_the_isolated_pass(tower_weights):
    objective = _objective(tower_weights, cc_target="towers", cc_form="spatial", lambda_cc=0.5)
    batch = make_batch([10, 20, 30], [1, 3, 5])
    outputs = objective(batch)
    assert outputs["cc/raw"].item() > 0 and outputs["cc/nps"].item() == 9
    torch.testing.assert_close(outputs["cc_loss"], 0.5 * outputs["cc/raw"])
    assert "cc/iso_budget" not in outputs  # no isolated pass
    # Nothing of the starting towers is a parameter of the objective: not trained, not checkpointed.
    names = set(objective.state_dict())
    assert all(name.startswith(("model.", "contrastive.")) for name in names)
    starting = objective.starting_towers(objective.model.backbone.clip.visual.conv1.weight)
    before = {name: tensor.clone() for name, tensor in starting.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in objective.parameters() if p.requires_grad], lr=1.0)
    sum(value for name, value in outputs.items() if name.endswith("_loss")).backward()
    assert objective.model.backbone.clip.visual.proj.grad is not None  # the loss trains the towers, through the head
    optimizer.step()
    assert all(torch.equal(tensor, before[name]) for name, tensor in starting.state_dict().items())
    assert not torch.equal(objective.model.backbone.clip.visual.proj, before["clip.visual.proj"])


def test_grounding_term_starts_at_zero_and_grows_as_the_towers_move(tower_weights):
    objective = _objective(tower_weights, lambda_cc=0.0, lambda_grounding=1.0)
    batch = make_batch([10, 20, 30], [1, 3, 5])
    outputs = objective(batch)
    assert outputs["grounding/raw"].item() == pytest.approx(0.0, abs=1e-6)  # the towers are still the starting ones
    assert "cc_loss" not in outputs and "fused/np_maps" not in outputs
    with torch.no_grad():
        objective.model.backbone.clip.visual.proj.add_(
            0.5 * torch.randn_like(objective.model.backbone.clip.visual.proj)
        )
    moved = objective(batch)
    assert moved["grounding/raw"].item() > 1e-4
    moved["grounding_loss"].backward()
    assert objective.model.backbone.clip.visual.proj.grad.abs().sum() > 0
    assert all(p.grad is None for p in objective.model.fusion.parameters())  # the term reaches the towers only


def test_l1_towers_target_and_batches_without_phrases(tower_weights):
    objective = _objective(tower_weights, cc_target="towers", cc_form="l1", cc_epsilon=0.0, lambda_grounding=0.1)
    outputs = objective(make_batch([10, 20, 30], [1, 3, 5]))
    # At the in-context map's mass the two levels agree; what is left is shape.
    torch.testing.assert_close(outputs["cc/ctx_level"], outputs["cc/iso_level"])
    empty = objective(make_batch([8, 5, 3], [0, 0, 0]))
    assert empty["cc/raw"].item() == 0.0 and empty["grounding/raw"].item() == 0.0
    total = sum(value for name, value in empty.items() if name.endswith("_loss"))
    total.backward()
    assert all(torch.isfinite(p.grad).all() for p in objective.parameters() if p.grad is not None)


def test_variant_settings_are_checked(tmp_path):
    with pytest.raises(ValueError, match="cc_target"):
        LossConfig(cc_target="tower")
    with pytest.raises(ValueError, match="cc_form"):
        LossConfig(cc_form="kl")
    with pytest.raises(ValueError, match="relative"):
        LossConfig(cc_maps="relative", cc_form="spatial")
    with pytest.raises(ValueError, match="cc_temperature"):
        LossConfig(cc_temperature=0.0)
    with pytest.raises(ValueError, match="model.weights_file or model.pretrained"):
        load_config("configs/tiny.yaml", ["loss.cc_target=towers"])
    with pytest.raises(ValueError, match="model.weights_file or model.pretrained"):
        load_config("configs/tiny.yaml", ["loss.lambda_cc=0", "loss.lambda_grounding=0.1"])
    assert load_config("configs/tiny.yaml", ["loss.lambda_cc=0", "loss.cc_target=towers"]).loss.cc_target == "towers"
