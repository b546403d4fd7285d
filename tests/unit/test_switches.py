"""The paper's ablation switches: frozen towers, per-group learning rates, a learnable temperature, and the two
departures from the released code (a text LayerNorm before the fusion keys/values, image tokens after ln_post),
whose defaults are the released code's."""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import pytest
import torch
from cc_oracle import make_batch, reference_cc_loss
from torch import nn

from training.engine.config import BatchGeometry, DeepSpeedConfig, OptimConfig
from training.engine.optimizer import build_optimizer
from training.engine.schedule import WarmupCosineRestarts, build_scheduler
from training.model.config import ModelConfig
from training.model.context_cir import build_model, rebuild_model
from training.model.weights import save_model_weights
from training.objectives.concept_consistency import concept_consistency_loss
from training.objectives.config import LossConfig
from training.objectives.context_cir import ConTextObjective
from training.objectives.contrastive import ContrastiveLoss

TINY = ModelConfig(backbone="ContextTiny", fusion_layers=2, fusion_heads=4)
BOTH_DEPARTURES = dataclasses.replace(TINY, text_kv_layernorm=True, image_tokens_after_ln_post=True)
TINY_YAML = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


def _perturb_fusion(model, seed: int = 1) -> None:
    """Move the zero-initialised output layers off zero, so that the text changes the fused tokens."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.fusion.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))


def _tower_of(name: str) -> str | None:
    """`image`, `text` or None (not a tower parameter) for a parameter name of the objective."""
    if ".backbone.clip.visual." in f".{name}":
        return "image"
    return "text" if ".backbone.clip." in f".{name}" else None


def _loss(outputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum(value for name, value in outputs.items() if name.endswith("_loss"))


# --- freezing ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("freeze", ["image", "text", "both"])
def test_frozen_towers_are_bitwise_unchanged_after_a_step_and_the_rest_moves(freeze):
    torch.manual_seed(0)
    objective = ConTextObjective(dataclasses.replace(TINY, freeze=freeze), LossConfig())
    _perturb_fusion(objective.model)
    optimizer = build_optimizer(objective, OptimConfig(lr=1e-3, min_lr=0.0, warmup_steps=0))
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    before = {name: p.detach().clone() for name, p in objective.named_parameters()}
    _loss(objective(make_batch([10, 20], [2, 3]))).backward()
    optimizer.step()

    moved_per_part: dict[str | None, int] = {}
    for name, parameter in objective.named_parameters():
        tower = _tower_of(name)
        if tower is not None and freeze in (tower, "both"):
            assert not parameter.requires_grad and parameter.grad is None and id(parameter) not in optimized, name
            assert torch.equal(parameter, before[name]), name
        elif parameter.requires_grad:
            assert id(parameter) in optimized, name
            if parameter.grad.abs().sum() > 0:
                assert not torch.equal(parameter, before[name]), name
                moved_per_part[tower] = moved_per_part.get(tower, 0) + 1
    trained = {None} | {tower for tower in ("image", "text") if freeze not in (tower, "both")}
    assert set(moved_per_part) == trained  # the head and every tower left free did train


def test_freeze_is_validated():
    with pytest.raises(ValueError, match="model.freeze"):
        ModelConfig(freeze="vision")


# --- per-group learning rates -----------------------------------------------------------------------------------


def test_equal_multipliers_keep_the_two_groups_earlier_runs_resume_with():
    objective = ConTextObjective(TINY, LossConfig())
    optimizer = build_optimizer(objective, OptimConfig(lr=1e-3, tower_lr_mult=0.5, head_lr_mult=0.5))
    assert [group["name"] for group in optimizer.param_groups] == ["decay", "no_decay"]
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([5e-4, 5e-4])


def test_group_lrs_follow_their_multipliers_through_the_schedule():
    torch.manual_seed(0)
    objective = ConTextObjective(TINY, LossConfig(learnable_temperature=True))
    config = OptimConfig(lr=1e-3, min_lr=1e-5, warmup_steps=3, restart_every=4, tower_lr_mult=0.1, head_lr_mult=2.0)
    optimizer = build_optimizer(objective, config)
    scheduler = build_scheduler(optimizer, config)
    groups = {group["name"]: group for group in optimizer.param_groups}
    assert list(groups) == ["head/decay", "head/no_decay", "tower/decay", "tower/no_decay"]  # head first: logged lr
    members = {name: {id(p) for p in group["params"]} for name, group in groups.items()}
    named = dict(objective.named_parameters())
    # The no-decay split holds inside each module group: norms, biases, embeddings, seeds, the temperature.
    assert id(named["model.backbone.clip.visual.conv1.weight"]) in members["tower/decay"]
    for name in ("model.backbone.clip.visual.ln_post.weight", "model.backbone.clip.positional_embedding"):
        assert id(named[name]) in members["tower/no_decay"], name
    assert id(named["model.fusion.blocks.0.q_proj.weight"]) in members["head/decay"]
    for name in ("model.fusion.blocks.0.q_proj.bias", "model.pooler.seed", "contrastive.logit_scale"):
        assert id(named[name]) in members["head/no_decay"], name
    assert sum(len(ids) for ids in members.values()) == sum(p.requires_grad for p in objective.parameters())
    assert groups["tower/decay"]["weight_decay"] == groups["head/decay"]["weight_decay"] == 0.01
    assert groups["tower/no_decay"]["weight_decay"] == groups["head/no_decay"]["weight_decay"] == 0.0

    multiplier = WarmupCosineRestarts(config.warmup_steps, config.restart_every, config.min_lr / config.lr)
    expected_mult = {"head": 2.0, "tower": 0.1}
    for step in range(12):
        for group in optimizer.param_groups:
            expected = config.lr * expected_mult[group["name"].split("/")[0]] * multiplier(step)
            assert group["lr"] == pytest.approx(expected, rel=1e-12), (step, group["name"])
        optimizer.step()
        scheduler.step()
    # Each group cycles between its own lr and min_lr, both scaled by its multiplier.
    tower_lrs = []
    for _ in range(8):
        tower_lrs.append(groups["tower/decay"]["lr"])
        optimizer.step()
        scheduler.step()
    assert max(tower_lrs) == pytest.approx(1e-4) and min(tower_lrs) > 1e-6


def test_lr_multipliers_are_validated():
    with pytest.raises(ValueError, match="optim.tower_lr_mult"):
        OptimConfig(tower_lr_mult=0.0)
    with pytest.raises(ValueError, match="optim.head_lr_mult"):
        OptimConfig(head_lr_mult=-1.0)


# --- learnable temperature --------------------------------------------------------------------------------------


def _embeddings(seed: int = 0) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    return tuple(nn.functional.normalize(torch.randn(4, 8, generator=generator), dim=-1) for _ in range(3))


def test_learnable_temperature_gets_a_gradient_and_moves():
    query, target, reference = _embeddings()
    fixed = ContrastiveLoss(0.07)
    assert list(fixed.parameters()) == [] and fixed.logit_scale is None  # absent when disabled
    learned = ContrastiveLoss(0.07, learnable_temperature=True)
    assert learned.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    result = learned(query, target, reference)
    torch.testing.assert_close(result["loss"], fixed(query, target, reference)["loss"])  # same at init
    assert result["temperature"].item() == pytest.approx(0.07)
    result["loss"].backward()
    assert learned.logit_scale.grad is not None and learned.logit_scale.grad.abs() > 0
    start = learned.logit_scale.detach().clone()
    torch.optim.SGD(learned.parameters(), lr=0.1).step()
    assert not torch.equal(learned.logit_scale.detach(), start)

    with torch.no_grad():  # beyond CLIP's clamp the scale stays at 100 and the loss sends nothing back
        learned.logit_scale.fill_(math.log(1000.0))
    learned.logit_scale.grad = None
    clamped = learned(query, target, reference)
    assert clamped["temperature"].item() == pytest.approx(0.01)
    clamped["loss"].backward()
    assert learned.logit_scale.grad.item() == 0.0


def test_learnable_temperature_is_a_parameter_of_the_objective():
    torch.manual_seed(0)
    objective = ConTextObjective(TINY, LossConfig(learnable_temperature=True))
    assert "contrastive.logit_scale" in dict(objective.named_parameters())
    assert "contrastive.logit_scale" in objective.state_dict()  # DeepSpeed checkpoints the module's state dict
    outputs = objective(make_batch([10, 20], [1, 2]))
    assert outputs["contrastive/temperature"].item() == pytest.approx(0.07)
    _loss(outputs).backward()
    assert objective.contrastive.logit_scale.grad.abs() > 0
    plain = ConTextObjective(TINY, LossConfig())
    assert not any("logit_scale" in name for name, p in plain.named_parameters() if p.requires_grad)
    assert "contrastive/temperature" not in plain(make_batch([10, 20], [1, 2]))
    with pytest.raises(ValueError, match="loss.temperature"):
        LossConfig(temperature=0.001, learnable_temperature=True)


# --- the same switches under DeepSpeed --------------------------------------------------------------------------


def _engine_step_rank(rank: int, world: int, zero_stage: int) -> dict:
    from training.engine.deepspeed_engine import build_engine, deepspeed_config

    torch.manual_seed(0)
    objective = ConTextObjective(dataclasses.replace(TINY, freeze="image"), LossConfig(learnable_temperature=True))
    _perturb_fusion(objective.model)
    optim = OptimConfig(lr=1e-3, min_lr=0.0, warmup_steps=0, tower_lr_mult=0.5)
    json_config = deepspeed_config(DeepSpeedConfig(zero_stage=zero_stage), BatchGeometry(2, 2, 1), False)
    engine, optimizer, _ = build_engine(objective, optim, json_config)
    before = {name: p.detach().clone() for name, p in engine.module.named_parameters()}
    engine.backward(_loss(engine(make_batch([10, 20], [2, 3]))))
    engine.step()
    after = dict(engine.module.named_parameters())
    changed = {name for name in before if not torch.equal(before[name], after[name].detach())}
    return {
        "image_changed": sorted(name for name in changed if _tower_of(name) == "image"),
        "text_changed": sum(_tower_of(name) == "text" for name in changed),
        "head_changed": sum(_tower_of(name) is None for name in changed),
        "temperature_changed": "contrastive.logit_scale" in changed,
        "temperature_shape": list(after["contrastive.logit_scale"].shape),  # not 0-d: see ContrastiveLoss
        "in_state": "contrastive.logit_scale" in engine.module.state_dict(),
        "lrs": {group["name"]: group["lr"] for group in optimizer.param_groups},
    }


@pytest.mark.parametrize("zero_stage", [0, 1, 2])
def test_deepspeed_steps_leave_a_frozen_tower_alone(zero_stage):
    from dist_harness import run_ranks

    (result,) = run_ranks(_engine_step_rank, 1, (zero_stage,))
    assert result["image_changed"] == []
    assert result["text_changed"] > 0 and result["head_changed"] > 0
    assert result["temperature_changed"] and result["in_state"] and result["temperature_shape"] == [1]
    head = result["lrs"]["head/decay"]  # one step into the cosine: just under optim.lr
    assert head == pytest.approx(1e-3, rel=1e-6)
    assert result["lrs"] == pytest.approx({"head/decay": head, "head/no_decay": head, "tower/decay": head / 2,
                                           "tower/no_decay": head / 2}, rel=1e-12)  # fmt: skip


# --- departures from the released code --------------------------------------------------------------------------


def _pair(switch: str, seed: int = 0):
    """(released-code model, the same weights with `switch` on), fusion perturbed so that the text matters."""
    torch.manual_seed(seed)
    released = build_model(TINY).eval()
    _perturb_fusion(released)
    with torch.no_grad():  # a trained text tower's final LayerNorm, not the identity affine of a fresh one
        final = released.backbone.clip.ln_final
        final.weight.copy_(1 + 0.5 * torch.randn_like(final.weight))
        final.bias.copy_(0.5 * torch.randn_like(final.bias))
    switched = build_model(dataclasses.replace(TINY, **{switch: True})).eval()
    missing, unexpected = switched.load_state_dict(released.state_dict(), strict=False)
    assert not unexpected and all(".text_norm." in name for name in missing)
    return released, switched


def test_defaults_are_the_released_code():
    torch.manual_seed(0)
    model = build_model(TINY).eval()
    assert ModelConfig().text_kv_layernorm is False and ModelConfig().image_tokens_after_ln_post is False
    assert model.switches == {"text_kv_layernorm": False, "image_tokens_after_ln_post": False}
    # Text states enter the key/value projections as the text tower returns them: no LayerNorm in between.
    assert not any(".text_norm." in name for name in model.state_dict())
    assert all(isinstance(block.text_norm, nn.Identity) for block in model.fusion.blocks)
    # Image tokens are the tower's final states before ln_post; the CLIP embedding still passes ln_post.
    images = torch.randn(2, 3, 64, 64)
    visual = model.backbone.clip.visual
    with torch.no_grad():
        features = model.backbone.encode_image(images)
        assert torch.equal(features.tokens, visual.transformer(visual._embeds(images)))
        torch.testing.assert_close(features.embedding, model.backbone.clip.encode_image(images))


def test_text_layernorm_switch_changes_the_query():
    released, switched = _pair("text_kv_layernorm")
    assert all(isinstance(block.text_norm, nn.LayerNorm) for block in switched.fusion.blocks)
    batch = make_batch([10, 30], [0, 0])
    with torch.no_grad():
        states = released.backbone.encode_text(batch["caption_ids"])
        block = switched.fusion.blocks[0]
        torch.testing.assert_close(block.text_norm(states), nn.functional.layer_norm(states, states.shape[-1:]))
        query = released.encode_query(batch["reference_image"], batch["caption_ids"])
        other = switched.encode_query(batch["reference_image"], batch["caption_ids"])
    assert not torch.allclose(query, other, atol=1e-4)


def test_ln_post_switch_changes_the_image_tokens_but_not_the_clip_embedding():
    released, switched = _pair("image_tokens_after_ln_post")
    batch = make_batch([10, 30], [0, 0])
    visual = released.backbone.clip.visual
    with torch.no_grad():
        tokens = switched.backbone.encode_image(batch["reference_image"])
        assert torch.equal(tokens.tokens, visual.ln_post(visual.transformer(visual._embeds(batch["reference_image"]))))
        plain = released.backbone.encode_image(batch["reference_image"])
        assert not torch.allclose(tokens.tokens, plain.tokens)
        torch.testing.assert_close(tokens.embedding, plain.embedding)
        query = released.encode_query(batch["reference_image"], batch["caption_ids"])
        other = switched.encode_query(batch["reference_image"], batch["caption_ids"])
    assert not torch.allclose(query, other, atol=1e-4)


def test_isolated_pass_and_fused_empty_follow_the_switches():
    """With both departures on, the efficient Text-CC pass still equals the oracle (which reads the switches),
    and the `fused_empty` gallery is still the query path with an empty caption."""
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(BOTH_DEPARTURES, target_encoding="fused_empty"))
    _perturb_fusion(model)
    batch = make_batch([6, 14], [2, 3])
    names = ("reference_image", "caption_ids", "target_image", "np_spans", "np_mask", "np_ids")
    outputs = model(*(batch[name] for name in names))
    maps, isolated = outputs["fused/np_maps"], outputs["fused/np_maps_isolated"]
    efficient = concept_consistency_loss(maps, isolated, batch["np_mask"], 0.002)
    oracle = reference_cc_loss(model, batch, 0.002)
    assert oracle.item() > 1e-3 and abs(efficient.item() - oracle.item()) < 1e-5
    empty = model.empty_caption_ids.expand(2, -1)
    with torch.no_grad():
        torch.testing.assert_close(
            model.encode_gallery(batch["target_image"]), model.encode_query(batch["target_image"], empty)
        )


def test_checkpoints_rebuild_with_their_recorded_switches(tmp_path, caplog):
    torch.manual_seed(0)
    model = build_model(BOTH_DEPARTURES).eval()
    _perturb_fusion(model)
    path = tmp_path / "model.safetensors"
    save_model_weights(model, path)
    images, ids = torch.randn(2, 3, 64, 64), make_batch([8, 12], [0, 0])["caption_ids"]
    with torch.no_grad():
        expected = model.encode_query(images, ids)
        rebuilt = rebuild_model(BOTH_DEPARTURES, path)
        assert rebuilt.switches == model.switches
        torch.testing.assert_close(rebuilt.encode_query(images, ids), expected, atol=0, rtol=0)
        # A checkpoint from before the switches existed records neither (both read False) but was built with
        # both on: its weights hold the text LayerNorms, which mark it.
        with caplog.at_level(logging.WARNING):
            legacy = rebuild_model(TINY, path)
        assert legacy.switches == {"text_kv_layernorm": True, "image_tokens_after_ln_post": True}
        assert "predates" in caplog.text
        torch.testing.assert_close(legacy.encode_query(images, ids), expected, atol=0, rtol=0)
        # A released-code network rebuilds as one.
        plain = build_model(TINY)
        save_model_weights(plain, tmp_path / "plain.safetensors")
        assert rebuild_model(TINY, tmp_path / "plain.safetensors").switches == plain.switches


def test_bundle_records_the_switches_it_was_rebuilt_with(tmp_path):
    from eval_fixtures import write_checkpoint

    from cluster.root_config import load_config
    from training.checkpoint import layout
    from training.retrieval.bundle import export_bundle, load_bundle

    switches = ["model.text_kv_layernorm=true", "model.image_tokens_after_ln_post=true"]
    config = load_config(TINY_YAML, [f"cluster.storage_path={tmp_path / 'runs'}", *switches])
    checkpoint = write_checkpoint(config.run_dir, 5, config)
    info = export_bundle(checkpoint, tmp_path / "bundle")
    assert info.model["text_kv_layernorm"] is True and info.model["image_tokens_after_ln_post"] is True
    retriever = load_bundle(tmp_path / "bundle", device="cpu")
    assert retriever.model.switches == {"text_kv_layernorm": True, "image_tokens_after_ln_post": True}
    # A checkpoint whose recorded section lacks the switches (written before they existed) exports as rebuilt.
    legacy_config = load_config(TINY_YAML, [f"cluster.storage_path={tmp_path / 'old'}"])
    legacy = write_checkpoint(legacy_config.run_dir, 5, legacy_config)
    save_model_weights(retriever.model, legacy / layout.WEIGHTS)
    legacy_info = export_bundle(legacy, tmp_path / "legacy_bundle")
    assert legacy_info.model["text_kv_layernorm"] is True and legacy_info.model["image_tokens_after_ln_post"] is True
