"""The efficient Text-CC pass against the straightforward oracle (tests/support/cc_oracle.py), on the tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cc_oracle import make_batch, reference_cc_loss

from cluster.root_config import load_config
from training.model.config import ModelConfig
from training.model.context_cir import build_model
from training.model.fusion import ConceptColumns, TextKeys
from training.objectives.concept_consistency import (
    attention_budget,
    concept_consistency_loss,
    concept_consistency_parts,
    relative_maps,
)
from training.objectives.config import LossConfig
from training.objectives.context_cir import ConTextObjective
from training.perf.released_cc import released_step_outputs
from training.perf.step import step_benchmark

EPSILON = 0.002  # small, so that most patch differences are above the slack and carry gradient
# NP counts 0..10 over 11 captions; two captions are 75 tokens long (EOT at position 76, the 77-token edge),
# and the last NP of every caption ends right before its EOT.
CAPTION_LENGTHS = [6, 3, 12, 75, 20, 9, 30, 15, 40, 75, 25]
NP_COUNTS = list(range(11))


def _tiny_model(attention: str = "fused", seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(ModelConfig(backbone="ContextTiny", fusion_layers=2, fusion_heads=4, attention=attention))
    with torch.no_grad():  # move the zero-initialised output layers off zero so every block mixes text in
        for parameter in model.fusion.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model


def _efficient_loss(model, batch) -> torch.Tensor:
    outputs = model(
        batch["reference_image"],
        batch["caption_ids"],
        batch["target_image"],
        batch["np_spans"],
        batch["np_mask"],
        batch["np_ids"],
    )
    return concept_consistency_loss(
        outputs["fused/np_maps"], outputs["fused/np_maps_isolated"], batch["np_mask"], EPSILON
    )


def _gradients(model, loss) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_efficient_text_cc_equals_oracle_with_gradients():
    model = _tiny_model("fused")
    batch = make_batch(CAPTION_LENGTHS, NP_COUNTS)
    assert batch["caption_ids"][3, 76] != 0 and batch["np_spans"][3, 2, 1] == 76  # an NP at the 77-token edge

    efficient = _efficient_loss(model, batch)
    efficient_grads = _gradients(model, efficient)
    oracle = reference_cc_loss(model, batch, EPSILON)
    oracle_grads = _gradients(model, oracle)

    assert oracle.item() > 1e-3  # the comparison is not between two zeros
    assert abs(efficient.item() - oracle.item()) < 1e-5
    assert efficient_grads.keys() == oracle_grads.keys()
    # The CC loss reaches the image tower, the text tower and every fusion block's query/key path.
    assert any(name.startswith("backbone.clip.visual") for name in oracle_grads)
    assert any(name.startswith("backbone.clip.transformer") for name in oracle_grads)
    assert any("fusion.blocks.1.k_proj" in name for name in oracle_grads)
    for name, expected in oracle_grads.items():
        torch.testing.assert_close(efficient_grads[name], expected, atol=1e-6, rtol=1e-4, msg=name)


def test_isolated_maps_carry_no_gradient_and_ignore_masked_slots():
    model = _tiny_model()
    batch = make_batch([10, 10], [2, 0])
    outputs = model(
        batch["reference_image"],
        batch["caption_ids"],
        batch["target_image"],
        batch["np_spans"],
        batch["np_mask"],
        batch["np_ids"],
    )
    assert outputs["fused/np_maps"].requires_grad
    assert not outputs["fused/np_maps_isolated"].requires_grad
    assert outputs["fused/np_maps"].shape == (2, 10, 64)
    assert torch.all(outputs["fused/np_maps_isolated"][~batch["np_mask"]] == 0)
    # A map is a probability mass over the text's keys: each patch's share lies in (0, 1).
    real = outputs["fused/np_maps"][batch["np_mask"]]
    assert torch.all(real > 0) and torch.all(real < 1)


def test_batch_without_noun_phrases_gives_zero_not_nan():
    torch.manual_seed(0)
    objective = ConTextObjective(ModelConfig(backbone="ContextTiny", fusion_layers=2, fusion_heads=4), LossConfig())
    batch = make_batch([8, 5, 3], [0, 0, 0])
    outputs = objective(batch)
    assert outputs["cc/raw"].item() == 0.0 and outputs["cc_loss"].item() == 0.0
    total = sum(value for name, value in outputs.items() if name.endswith("_loss"))
    total.backward()
    assert torch.isfinite(total)
    assert all(torch.isfinite(p.grad).all() for p in objective.parameters() if p.grad is not None)


def test_objective_reports_weighted_and_raw_cc():
    torch.manual_seed(0)
    objective = ConTextObjective(
        ModelConfig(backbone="ContextTiny", fusion_layers=2, fusion_heads=4), LossConfig(cc_epsilon=0.0)
    )
    outputs = objective(make_batch([10, 20, 30], [1, 3, 5]))
    assert set(outputs) >= {"contrastive_loss", "cc_loss", "cc/raw", "contrastive/accuracy", "cc/nps"}
    assert outputs["cc/raw"].item() > 0
    torch.testing.assert_close(outputs["cc_loss"], 0.08 * outputs["cc/raw"])
    assert outputs["cc/nps"].item() == 9
    assert {"cc/ctx_level", "cc/iso_level", "cc/shape_gap", "cc/below", "cc/ctx_budget", "cc/iso_budget"} <= set(
        outputs
    )
    # The phrases' spans are disjoint, so in context they share one softmax: at most all of a patch's attention.
    assert 0.0 < outputs["cc/ctx_budget"].item() <= 1.0
    assert 0.0 <= outputs["cc/below"].item() <= 1.0


def test_cc_parts_separate_a_level_offset_from_a_shape_difference():
    """A map lowered uniformly differs only in level (every active patch below); a moved peak only in shape."""
    target = torch.full((1, 2, 16), 0.1)
    target[0, :, 3] = 0.5
    np_mask = torch.tensor([[True, False]])
    lowered = target - 0.06
    parts = concept_consistency_parts(lowered, target, np_mask, epsilon=0.01)
    torch.testing.assert_close(parts["cc/iso_level"], target[0, 0].mean())
    torch.testing.assert_close(parts["cc/ctx_level"], target[0, 0].mean() - 0.06)
    torch.testing.assert_close(parts["cc/shape_gap"], torch.tensor(0.0))
    assert parts["cc/below"].item() == 1.0
    moved = target.clone()
    moved[0, :, 3], moved[0, :, 9] = 0.1, 0.5
    parts = concept_consistency_parts(moved, target, np_mask, epsilon=0.01)
    torch.testing.assert_close(parts["cc/ctx_level"], parts["cc/iso_level"])
    torch.testing.assert_close(parts["cc/shape_gap"], torch.tensor(0.8 / 16))
    assert parts["cc/below"].item() == 0.5  # patch 3 below its target, patch 9 above
    padded = target.clone()
    padded[0, 1] = 9.0  # a padding NP row never counts
    torch.testing.assert_close(
        concept_consistency_parts(lowered, padded, np_mask, 0.01)["cc/shape_gap"], torch.tensor(0.0)
    )


def test_attention_budget_sums_each_captions_phrases():
    in_context = torch.tensor([[[0.1, 0.3], [0.2, 0.2]], [[0.5, 0.5], [9.0, 9.0]]])  # (2 captions, 2 NPs, 2 patches)
    isolated = 2 * in_context
    lengths = torch.tensor([[2, 3], [1, 0]])  # the second caption has one phrase; its padding row never counts
    budget = attention_budget(in_context, isolated, lengths)
    first, second = 0.2 * 2 + 0.2 * 3, 0.5 * 1
    torch.testing.assert_close(budget["cc/ctx_budget"], torch.tensor((first + second) / 2))
    torch.testing.assert_close(budget["cc/iso_budget"], torch.tensor(first + second))
    empty = attention_budget(in_context, isolated, torch.zeros(2, 2, dtype=torch.long))
    torch.testing.assert_close(empty["cc/iso_budget"], torch.tensor(0.0))


def test_relative_maps_compare_where_the_attention_goes_not_how_much():
    """`loss.cc_maps=relative` ignores a uniform level offset that the paper's loss pays for on every patch."""
    isolated = torch.rand(2, 3, 16) + 0.1
    np_mask = torch.tensor([[True, True, False], [True, False, False]])
    lowered = 0.3 * isolated
    assert concept_consistency_loss(lowered, isolated, np_mask, 0.05).item() > 0.05
    relative = concept_consistency_loss(relative_maps(lowered), relative_maps(isolated), np_mask, 0.0)
    torch.testing.assert_close(relative, torch.tensor(0.0))
    moved = isolated.roll(1, dims=-1)
    assert concept_consistency_loss(relative_maps(moved), relative_maps(isolated), np_mask, 0.0).item() > 0.05
    torch.testing.assert_close(relative_maps(isolated).mean(dim=-1), torch.ones(2, 3))
    with pytest.raises(ValueError, match="loss.cc_maps"):
        LossConfig(cc_maps="normalised")


def test_objective_with_relative_maps_logs_maps_of_mean_one():
    torch.manual_seed(0)
    model_config = ModelConfig(backbone="ContextTiny", fusion_layers=2, fusion_heads=4)
    batch = make_batch([10, 20, 30], [1, 3, 5])
    outputs = ConTextObjective(model_config, LossConfig(cc_maps="relative", cc_epsilon=0.0))(batch)
    torch.testing.assert_close(outputs["cc/ctx_level"], torch.tensor(1.0))
    torch.testing.assert_close(outputs["cc/iso_level"], torch.tensor(1.0))
    assert outputs["cc/raw"].item() > 0
    outputs["cc_loss"].backward()


def test_bf16_autocast_forward_matches_fp32_loosely():
    torch.manual_seed(0)
    objective = ConTextObjective(
        ModelConfig(backbone="ContextTiny", fusion_layers=2, fusion_heads=4), LossConfig(cc_epsilon=0.0)
    )
    batch = make_batch([10, 20, 75], [2, 4, 10])
    exact = objective(batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = objective(batch)
        total = sum(value for name, value in low.items() if name.endswith("_loss"))
    total.backward()
    for name in ("contrastive_loss", "cc/raw"):
        assert torch.isfinite(low[name])
        torch.testing.assert_close(low[name].float(), exact[name], atol=2e-2, rtol=5e-2, msg=name)


def test_benchmark_reference_path_computes_the_same_loss():
    # The released-code path the step benchmark times against must compute what the efficient path computes.
    torch.manual_seed(0)
    objective = ConTextObjective(
        ModelConfig(backbone="ContextTiny", fusion_layers=2, fusion_heads=4), LossConfig(cc_epsilon=0.001)
    )
    with torch.no_grad():
        for parameter in objective.model.fusion.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    batch = make_batch([10, 75, 30], [3, 10, 0])
    efficient, released = objective(batch), released_step_outputs(objective, batch)
    assert efficient["cc/raw"].item() > 0
    for name in ("contrastive_loss", "cc_loss", "cc/raw"):
        torch.testing.assert_close(efficient[name], released[name], atol=1e-6, rtol=1e-5, msg=name)


def test_step_benchmark_reports_every_figure():
    config = load_config(
        Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml", ["train.micro_batch=2", "train.global_batch=4"]
    )
    result = step_benchmark(config, repeats=1, nps=[3, 10])
    assert result["device"] == "cpu" and [row["nps"] for row in result["by_nps"]] == [3, 10]
    for row in result["by_nps"]:
        for key in ("cc_efficient_s", "cc_reference_s", "attn_fused_s", "attn_eager_s"):
            assert row[key] > 0
        assert row["cc_ratio"] == pytest.approx(row["cc_efficient_s"] / row["cc_reference_s"])
        assert row["attn_ratio"] == pytest.approx(row["attn_fused_s"] / row["attn_eager_s"])


def test_released_emulation_runs_only_the_noun_phrases_that_exist():
    """Its cost falls with fewer phrases, as the released code's does: one whole-model call per existing phrase."""
    from training.perf.released_cc import released_isolated_maps

    model = _tiny_model()
    batch = make_batch([10, 30], [1, 3])  # 1 and 3 phrases of 10 slots
    calls = []
    hook = model.backbone.clip.visual.conv1.register_forward_hook(lambda module, args, out: calls.append(len(args[0])))
    try:
        maps = released_isolated_maps(model, batch["reference_image"], batch["np_ids"], batch["np_mask"])
    finally:
        hook.remove()
    assert calls == [2, 1, 1]  # slot 0 for both images, slots 1 and 2 for the second only; empty slots never run
    assert torch.all(maps[0, 1:] == 0) and torch.all(maps[1, 3:] == 0) and torch.all(maps[1, :3].sum(-1) > 0)


@pytest.mark.slow
def test_torch_compile_matches_eager_mode():
    # The whole forward through dynamo + AOT autograd (graph breaks at the data-dependent lengths included), and
    # the fusion head, with its fused-attention-with-lse kernel and the lse gradient, through inductor.
    model = _tiny_model()
    batch = make_batch([10, 30], [3, 5])
    arguments = [batch[name] for name in ("reference_image", "caption_ids", "target_image", "np_spans", "np_mask")]
    expected = model(*arguments, batch["np_ids"])
    compiled = torch.compile(model, backend="aot_eager")(*arguments, batch["np_ids"])
    for name, value in expected.items():
        torch.testing.assert_close(compiled[name], value, atol=1e-5, rtol=1e-4, msg=name)

    features = model.backbone.encode_image(batch["reference_image"])
    ids = batch["caption_ids"][:, :32]
    keys = TextKeys.of(model.backbone.encode_text(ids), ids)
    concepts = ConceptColumns.from_spans(batch["np_spans"], batch["np_mask"], 32, query_prefix=1)
    head_inputs = (features.tokens, keys, concepts)
    tokens, maps = model.fusion(*head_inputs)
    compiled_tokens, compiled_maps = torch.compile(model.fusion)(*head_inputs)
    torch.testing.assert_close(compiled_tokens, tokens, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(compiled_maps, maps, atol=1e-5, rtol=1e-4)
    gradient = torch.autograd.grad(maps.sum(), model.fusion.blocks[0].k_proj.weight)[0]
    compiled_gradient = torch.autograd.grad(compiled_maps.sum(), model.fusion.blocks[0].k_proj.weight)[0]
    torch.testing.assert_close(compiled_gradient, gradient, atol=1e-5, rtol=1e-4)
