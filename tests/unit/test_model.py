"""The ConText-CIR network: backbone sizes, weights files, errors, fusion blocks and attention paths."""

from __future__ import annotations

import dataclasses
import socket
import time

import open_clip
import pytest
import torch
from cc_oracle import make_batch
from safetensors.torch import save_file

from training.model.config import ModelConfig
from training.model.context_cir import build_model
from training.model.fusion import ConceptColumns, CrossAttentionBlock, FusionHead, TextKeys, key_padding_mask
from training.model.towers import PretrainedWeightsUnavailable, build_backbone
from training.model.weights import load_model_weights, save_model_weights

TINY = ModelConfig(backbone="ContextTiny", fusion_layers=2, fusion_heads=4)


# (name, image size, patch grid, image width, text width, joint dim)
SIZES = [
    ("ViT-B-32", 224, 7, 768, 512, 512),
    ("ViT-B-16", 224, 14, 768, 512, 512),
    ("ViT-L-14", 224, 16, 1024, 768, 768),
    ("ViT-H-14", 224, 16, 1280, 1024, 1024),
]


@pytest.mark.parametrize(("name", "size", "grid", "width", "text_width", "dim"), SIZES)
def test_every_backbone_size_builds_without_weights_and_has_the_right_shapes(name, size, grid, width, text_width, dim):
    # The meta device builds the full architecture (ViT-H-14 has ~1B parameters) without allocating weights,
    # and runs the forward for shapes only; the tiny model below checks values.
    model = build_model(ModelConfig(backbone=name), device="meta")
    assert model.patch_grid == (grid, grid)
    images = torch.empty(2, 3, size, size, device="meta")
    ids = torch.zeros(2, 77, dtype=torch.long, device="meta")
    features = model.backbone.encode_image(images)
    assert features.tokens.shape == (2, 1 + grid * grid, width)
    assert model.backbone.encode_text(ids).shape == (2, 77, text_width)
    assert model.encode_query(images, ids).shape == (2, dim)
    assert model.encode_gallery(images).shape == (2, dim)
    spans = torch.zeros(2, 10, 2, dtype=torch.long, device="meta")
    mask = torch.zeros(2, 10, dtype=torch.bool, device="meta")
    assert model.concept_maps(images, ids, spans, mask).shape == (2, 10, grid, grid)
    assert len(model.fusion.blocks) == 4 and model.fusion.blocks[0].heads == 8


def test_tiny_model_forward_shapes():
    torch.manual_seed(0)
    model = build_model(TINY)
    batch = make_batch([5, 75], [2, 10])
    outputs = model(
        *(batch[k] for k in ("reference_image", "caption_ids", "target_image", "np_spans", "np_mask", "np_ids"))
    )
    assert outputs["fused/query"].shape == outputs["img/target"].shape == outputs["img/reference"].shape == (2, 64)
    for key in ("fused/query", "img/target", "img/reference"):
        torch.testing.assert_close(outputs[key].norm(dim=-1), torch.ones(2))
    assert outputs["fused/np_maps"].shape == outputs["fused/np_maps_isolated"].shape == (2, 10, 64)
    maps = model.concept_maps(batch["reference_image"], batch["caption_ids"], batch["np_spans"], batch["np_mask"])
    assert maps.shape == (2, 10, 8, 8)
    torch.testing.assert_close(maps.flatten(2), outputs["fused/np_maps"].detach())


def test_fusion_blocks_are_the_identity_at_init():
    torch.manual_seed(0)
    head = FusionHead(width=32, text_width=24, layers=3, heads=8, ffn_mult=4)
    tokens, text = torch.randn(2, 17, 32), torch.randn(2, 9, 24)
    valid = torch.ones(2, 9, dtype=torch.bool)
    for eager in (False, True):
        fused, _ = head(tokens, TextKeys(text, valid), eager=eager)
        assert torch.equal(fused, tokens)
    # Not a block that ignores its input: one step of training moves it off the identity.
    block = head.blocks[0]
    out, _ = block(tokens, TextKeys(text, valid))
    out.square().sum().backward()
    assert block.out_proj.weight.grad.abs().sum() > 0


def _fusion_inputs(seed: int = 0):
    torch.manual_seed(seed)
    block = CrossAttentionBlock(width=32, text_width=24, heads=4, ffn_mult=2)
    with torch.no_grad():
        for parameter in block.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    ids = torch.tensor([[49406, 5, 6, 7, 49407, 0, 0, 0], [49406, 9, 49407, 0, 0, 0, 0, 0]])
    spans = torch.tensor([[[1, 3], [2, 4]], [[1, 2], [0, 0]]])
    mask = torch.tensor([[True, True], [True, False]])
    concepts = ConceptColumns.from_spans(spans, mask, ids.shape[1], query_prefix=1)
    return block, torch.randn(2, 5, 32), torch.randn(2, 8, 24), key_padding_mask(ids), concepts


def test_fused_attention_equals_eager_and_pad_keys_get_zero_attention():
    block, tokens, text, valid, concepts = _fusion_inputs()
    keys = TextKeys(text, valid)
    fused_tokens, fused_maps = block(tokens, keys, concepts)
    plain_tokens, _ = block(tokens, keys)  # plain SDPA, no maps
    eager_tokens, eager_maps = block(tokens, keys, concepts, eager=True)
    torch.testing.assert_close(fused_tokens, eager_tokens, atol=1e-5, rtol=0)
    torch.testing.assert_close(plain_tokens, eager_tokens, atol=1e-5, rtol=0)
    torch.testing.assert_close(fused_maps, eager_maps, atol=1e-5, rtol=0)

    # Eager: the probabilities of PAD columns are exactly zero.
    from training.model.concept_maps import column_probabilities
    from training.model.fusion import attention_eager, split_heads

    query = split_heads(block.q_proj(block.query_norm(tokens)), 4)
    key = split_heads(block.k_proj(block.text_norm(text)), 4)
    _, probabilities = attention_eager(query, key, key, valid)
    assert torch.all(probabilities[0, :, :, 5:] == 0) and torch.all(probabilities[1, :, :, 3:] == 0)
    # Fused: changing what sits in PAD positions changes nothing, and PAD columns read as zero probability.
    noisy = text.clone()
    noisy[0, 5:] += 100 * torch.randn(3, 24)
    noisy[1, 3:] -= 50
    for path in ({}, {"concepts": concepts}):
        torch.testing.assert_close(block(tokens, TextKeys(noisy, valid), **path)[0], block(tokens, keys, **path)[0])
    from training.model.fusion import attention_fused_with_lse

    _, lse = attention_fused_with_lse(query, key, key, valid)
    every_column = torch.arange(8).expand(2, 8)
    fused_probabilities = column_probabilities(query, key, lse, every_column, valid)
    assert torch.all(fused_probabilities[0, :, :, 5:] == 0) and torch.all(fused_probabilities[1, :, :, 3:] == 0)
    torch.testing.assert_close(fused_probabilities, probabilities, atol=1e-6, rtol=0)


def test_concept_columns_keep_only_np_tokens():
    spans = torch.tensor([[[2, 5], [3, 4], [0, 0]], [[1, 2], [0, 0], [0, 0]]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    concepts = ConceptColumns.from_spans(spans, mask, 10)
    assert concepts.columns.tolist() == [[2, 3, 4], [1, 0, 0]]
    torch.testing.assert_close(concepts.weights[0, 0], torch.full((3,), 1 / 3))
    assert concepts.weights[0, 1].tolist() == [0.0, 1.0, 0.0]
    assert concepts.weights[1].tolist() == [[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]


def test_clip_baselines_equal_open_clip_encoders():
    torch.manual_seed(0)
    model = build_model(TINY).eval()
    batch = make_batch([5, 40, 75], [0, 0, 0])
    clip = model.backbone.clip
    with torch.no_grad():
        torch.testing.assert_close(
            model.encode_text_clip(batch["caption_ids"]), clip.encode_text(batch["caption_ids"], normalize=True)
        )
        torch.testing.assert_close(
            model.encode_image_clip(batch["reference_image"]),
            clip.encode_image(batch["reference_image"], normalize=True),
        )


def test_query_views_equal_the_separate_encoders():
    """The eval job's one-pass encoder returns exactly what the three separate encoders return."""
    torch.manual_seed(0)
    model = build_model(TINY).eval()
    batch = make_batch([5, 40, 75], [0, 0, 0])
    images, ids = batch["reference_image"], batch["caption_ids"]
    with torch.no_grad():
        views = model.encode_query_views(images, ids)
        torch.testing.assert_close(views["fused/query"], model.encode_query(images, ids))
        torch.testing.assert_close(views["img/reference"], model.encode_image_clip(images))
        torch.testing.assert_close(views["txt/caption"], model.encode_text_clip(ids))


def test_fused_empty_gallery_is_the_query_path_with_an_empty_caption():
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(TINY, target_encoding="fused_empty")).eval()
    images = torch.randn(3, 3, 64, 64)
    empty = open_clip.tokenize([""] * 3)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_gallery(images), model.encode_query(images, empty))
        assert not torch.allclose(model.encode_gallery(images), model.encode_image_clip(images))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_local_open_clip_weights_file_gives_bitwise_equal_towers(tmp_path, suffix):
    torch.manual_seed(123)
    source = build_backbone(ModelConfig(backbone="ContextTiny")).clip
    path = tmp_path / f"open_clip_model{suffix}"
    state = {name: tensor.contiguous() for name, tensor in source.state_dict().items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)

    torch.manual_seed(999)  # a different random init, overwritten by the file
    model = build_model(dataclasses.replace(TINY, weights_file=str(path)))
    batch = make_batch([7, 75], [0, 0])
    with torch.no_grad():
        assert torch.equal(model.backbone.encode_image(batch["reference_image"]).tokens, _tokens(source, batch))
        assert torch.equal(
            model.encode_text_clip(batch["caption_ids"]), source.encode_text(batch["caption_ids"], normalize=True)
        )


def _tokens(clip, batch):
    """The image tokens the fusion head attends from by default: CLS then patches, before `ln_post`."""
    visual = clip.visual
    return visual.transformer(visual._embeds(batch["reference_image"]))


def test_weights_file_that_does_not_fit_is_a_clear_error(tmp_path):
    path = tmp_path / "wrong.safetensors"
    save_file({"visual.proj": torch.zeros(3, 3)}, str(path))
    with pytest.raises(ValueError, match="does not fit"):
        build_model(dataclasses.replace(TINY, weights_file=str(path)))
    with pytest.raises(FileNotFoundError, match="model.weights_file"):
        build_model(dataclasses.replace(TINY, weights_file=str(tmp_path / "absent.safetensors")))


def test_missing_pretrained_weights_fail_fast_with_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.monotonic()
    config = ModelConfig(backbone="ViT-B-32", pretrained="laion2b_s34b_b79k", cache_dir=str(tmp_path))
    with pytest.raises(PretrainedWeightsUnavailable) as error:
        build_model(config, device="meta")
    assert time.monotonic() - started < 10
    message = str(error.value)
    assert "ViT-B-32" in message and "laion2b_s34b_b79k" in message and "model.weights_file" in message
    # Hub not switched off but unreachable (no network in tests: the connection attempt is what gets refused).
    monkeypatch.delenv("HF_HUB_OFFLINE")
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)

    def refuse(address, timeout):
        raise ConnectionRefusedError(f"no route to {address[0]}")

    monkeypatch.setattr(socket, "create_connection", refuse)
    with pytest.raises(PretrainedWeightsUnavailable, match="huggingface.co unreachable"):
        build_model(config, device="meta")
    with pytest.raises(ValueError, match="not an open_clip tag"):
        build_model(dataclasses.replace(config, pretrained="no-such-tag"), device="meta")
    with pytest.raises(ValueError, match="unknown open_clip backbone"):
        build_model(ModelConfig(backbone="ViT-Q-99"), device="meta")


def test_cached_pretrained_tag_loads_from_disk_without_the_network(tmp_path, monkeypatch):
    # A tag whose weights sit in the Hugging Face cache layout is loaded from there, with the hub off and every
    # connection refused. ContextTiny has no real tags, so the test gives it one.
    torch.manual_seed(5)
    source = build_backbone(ModelConfig(backbone="ContextTiny")).clip
    snapshot = tmp_path / "models--test-org--context-tiny" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    save_file(
        {k: v.contiguous() for k, v in source.state_dict().items()}, str(snapshot / "open_clip_model.safetensors")
    )
    (tmp_path / "models--test-org--context-tiny" / "refs").mkdir()
    (tmp_path / "models--test-org--context-tiny" / "refs" / "main").write_text("0123abcd")
    tags = {("ContextTiny", "test-tag"): {"hf_hub": "test-org/context-tiny/"}}
    monkeypatch.setattr(open_clip, "get_pretrained_cfg", lambda name, tag: tags.get((name, tag), {}))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket, "create_connection", lambda *args, **kwargs: pytest.fail("network touched"))

    model = build_model(dataclasses.replace(TINY, pretrained="test-tag", cache_dir=str(tmp_path)))
    batch = make_batch([7, 75], [0, 0])
    with torch.no_grad():
        assert torch.equal(model.backbone.encode_image(batch["reference_image"]).tokens, _tokens(source, batch))


def test_model_weights_round_trip_and_strict_errors(tmp_path):
    torch.manual_seed(0)
    model = build_model(TINY)
    path = tmp_path / "model.safetensors"
    save_model_weights(model, path)
    torch.manual_seed(1)
    other = build_model(TINY)
    images, ids = torch.randn(2, 3, 64, 64), open_clip.tokenize(["a red cube", "remove the ball"])
    assert not torch.equal(other.encode_query(images, ids), model.encode_query(images, ids))
    load_model_weights(other, path)
    assert torch.equal(other.encode_query(images, ids), model.encode_query(images, ids))
    with pytest.raises(ValueError, match="does not fit"):
        load_model_weights(build_model(dataclasses.replace(TINY, fusion_layers=3)), path)


def test_grad_checkpointing_switch_keeps_gradients():
    batch = make_batch([10, 20], [1, 2])

    def gradients(checkpointing: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = build_model(dataclasses.replace(TINY, grad_checkpointing=checkpointing))
        assert model.backbone.clip.visual.transformer.grad_checkpointing is checkpointing
        assert model.backbone.clip.transformer.grad_checkpointing is checkpointing
        outputs = model(batch["reference_image"], batch["caption_ids"], batch["target_image"])
        (outputs["fused/query"] * outputs["img/target"]).sum().backward()
        return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, msg=name)


def test_unused_clip_parameters_are_frozen():
    model = build_model(TINY)
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"backbone.clip.logit_scale", "backbone.clip.text_projection"}
    batch = make_batch([10, 20], [1, 2])
    outputs = model(
        *(batch[k] for k in ("reference_image", "caption_ids", "target_image", "np_spans", "np_mask", "np_ids"))
    )
    (outputs["fused/query"].sum() + outputs["img/target"].sum() + outputs["fused/np_maps"].sum()).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_lse_fallback_counts_the_lse_gradient_once(monkeypatch):
    """A device without the fused lse kernel falls back to explicit scores; gradients stay those of the kernel path."""
    from training.model import fusion

    block, tokens, text, valid, concepts = _fusion_inputs(seed=3)
    keys = TextKeys(text, valid)

    def gradients() -> tuple[torch.Tensor, list[torch.Tensor]]:
        block.zero_grad(set_to_none=True)
        query_tokens = tokens.clone().requires_grad_(True)
        out, maps = block(query_tokens, keys, concepts)
        (out.square().sum() + 10 * maps.square().sum()).backward()
        return maps.detach(), [query_tokens.grad, *(p.grad.clone() for p in block.parameters())]

    kernel_maps, kernel_grads = gradients()

    def unsupported(*args, **kwargs):
        raise RuntimeError("_scaled_dot_product_efficient_attention: this dtype is not supported on this device")

    monkeypatch.setattr(fusion, "_kernel_with_lse", unsupported)
    fallback_maps, fallback_grads = gradients()
    torch.testing.assert_close(fallback_maps, kernel_maps, atol=1e-6, rtol=0)
    ratio = (
        torch.cat([g.flatten() for g in fallback_grads]).norm() / torch.cat([g.flatten() for g in kernel_grads]).norm()
    )
    assert abs(float(ratio) - 1.0) < 1e-5, float(ratio)  # was 2.0 on the maps' part: the fallback lse had a gradient
    for fallback, kernel in zip(fallback_grads, kernel_grads):
        torch.testing.assert_close(fallback, kernel, atol=1e-5, rtol=1e-4)

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(fusion, "_kernel_with_lse", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):  # never hidden behind a slower path
        block(tokens, keys, concepts)


def test_concept_maps_stay_fp32_under_bf16_autocast():
    model = build_model(TINY).eval()
    batch = make_batch([12, 20], [3, 4])
    arguments = [batch[name] for name in ("reference_image", "caption_ids", "target_image", "np_spans", "np_mask")]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(*arguments, batch["np_ids"])
        maps = model.concept_maps(*arguments[:2], batch["np_spans"], batch["np_mask"])
    assert outputs["fused/np_maps"].dtype == torch.float32
    assert outputs["fused/np_maps_isolated"].dtype == torch.float32
    assert maps.dtype == torch.float32


def test_towers_rebuild_with_the_activation_of_their_weights():
    """A tag trained with QuickGELU (OpenAI's) is recorded as such, and a rebuild without the tag keeps it."""
    from open_clip.transformer import QuickGELU

    from training.model.towers import tag_quick_gelu, with_tower_flags

    assert tag_quick_gelu("ViT-B-32", "openai") and not tag_quick_gelu("ViT-B-32", "laion2b_s34b_b79k")
    assert with_tower_flags(ModelConfig(backbone="ViT-B-32", pretrained="openai")).quick_gelu is True
    assert with_tower_flags(ModelConfig(backbone="ContextTiny")).quick_gelu is False
    quick = build_model(dataclasses.replace(TINY, quick_gelu=True))
    plain = build_model(TINY)
    assert isinstance(quick.backbone.clip.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    assert not isinstance(plain.backbone.clip.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)


_VALUE_READS = ("item", "tolist", "nonzero", "numpy", "__bool__", "__int__", "__float__", "__index__")
"""Every way Python code reads a tensor's values: on a GPU each one makes the host wait for the device."""


def _refuse_value_reads(monkeypatch) -> None:
    def refuse(name: str):
        def read(*args, **kwargs):
            raise AssertionError(f"Tensor.{name}: the forward read a tensor value (a host sync on a GPU)")

        return read

    for name in _VALUE_READS:
        monkeypatch.setattr(torch.Tensor, name, refuse(name))
    monkeypatch.setattr(torch, "nonzero", refuse("torch.nonzero"))


@pytest.mark.parametrize("pixels", [False, True], ids=["normalised", "uint8"])
def test_the_training_step_reads_no_tensor_value_when_the_host_gave_the_layout(monkeypatch, pixels):
    """The training loop reads the batch's sizes on the host before the copy (`BatchLayout`); the forward and
    backward then never wait for the device, and give the same losses, bit for bit, as without the layout. The
    reader's uint8 pixels, normalised in the forward, add no wait either."""
    from training.model.batch_layout import BatchLayout
    from training.objectives.config import LossConfig
    from training.objectives.context_cir import ConTextObjective
    from training.trainer.loop import to_device

    torch.manual_seed(0)
    objective = ConTextObjective(TINY, LossConfig())
    batch = make_batch([10, 75, 30], [3, 10, 0])  # long and short captions, a caption without phrases
    if pixels:
        for name in ("reference_image", "target_image"):
            batch[name] = torch.randint(0, 256, batch[name].shape, dtype=torch.uint8)
    expected = objective(batch)
    moved = to_device(batch, torch.device("cpu"))  # as the loop hands batches to the engine
    assert isinstance(moved["layout"], BatchLayout) and moved["layout"].np_count == 13

    _refuse_value_reads(monkeypatch)
    outputs = objective(moved)
    sum(value for name, value in outputs.items() if name.endswith("_loss")).backward()
    # Without the layout the forward reads the sizes from the tensors: the refusal above does catch that.
    with pytest.raises(AssertionError, match="host sync"):
        objective(batch)
    monkeypatch.undo()

    assert expected.keys() == outputs.keys()
    for name, value in expected.items():
        assert torch.equal(value, outputs[name]), name
