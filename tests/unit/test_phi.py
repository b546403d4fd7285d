"""Textual inversion phi: pseudo-words enter the text tower exactly where the placeholder stood, noun phrases
collapse into one placeholder, and both objectives train phi alone (the towers stay fixed)."""

from __future__ import annotations

import pytest
import torch

from shards.model_inputs import tokenizer
from training.model.config import ModelConfig
from training.zeroshot.config import PhiConfig
from training.zeroshot.phi_net import PhiNetwork, PhiObjective, mask_noun_phrases
from training.zeroshot.pseudo_words import encode_with_pseudo_words, fill_template, placeholder_id

TINY = ModelConfig(backbone="ContextTiny", fusion_layers=1, fusion_heads=4)


@pytest.fixture(scope="module")
def network() -> PhiNetwork:
    torch.manual_seed(0)
    return PhiNetwork(TINY, PhiConfig(concepts=["red circle", "blue square"])).eval()


def test_a_pseudo_word_equal_to_a_real_token_reads_like_that_word(network) -> None:
    tokenize = tokenizer("ContextTiny")
    backbone = network.backbone
    word_id = int(tokenize(["cat"])[0, 1])
    with torch.no_grad():
        word = backbone.token_embedding(torch.tensor([[word_id]]))  # (1, 1, W)
        ids = tokenize([fill_template("a photo of $ that {caption}", "Is Blue.")])
        pseudo = encode_with_pseudo_words(backbone, ids, word, placeholder_id(tokenize))
        real_ids = tokenize(["a photo of cat that is blue"])
        real = backbone.text_embedding(backbone.encode_text(real_ids), real_ids)
        other = encode_with_pseudo_words(backbone, ids, torch.randn_like(word) * 3, placeholder_id(tokenize))
    torch.testing.assert_close(pseudo, real)
    assert not torch.allclose(other, real, atol=1e-3)  # the word matters
    with pytest.raises(ValueError, match="placeholder"):
        encode_with_pseudo_words(backbone, tokenize(["no slot here"]), word, placeholder_id(tokenize))


def test_noun_phrases_collapse_into_one_placeholder_each() -> None:
    ids = torch.tensor([[49406, 10, 11, 12, 13, 14, 49407, 0], [49406, 20, 21, 49407, 0, 0, 0, 0]])
    spans = torch.tensor([[[2, 4], [5, 6]], [[0, 0], [0, 0]]])
    mask = torch.tensor([[True, True], [False, False]])
    masked = mask_noun_phrases(ids, spans, mask, placeholder=7)
    assert masked.tolist() == [[49406, 10, 7, 13, 7, 49407, 0, 0], ids[1].tolist()]


@pytest.mark.parametrize("objective", ["image", "text"])
def test_each_objective_trains_phi_alone_and_lowers_its_loss(objective: str) -> None:
    torch.manual_seed(0)
    module = PhiObjective(TINY, PhiConfig(objective=objective, concepts=["red circle", "blue square"], dropout=0.0))
    trainable = {name for name, parameter in module.named_parameters() if parameter.requires_grad}
    assert trainable and all(name.startswith("model.phi.") for name in trainable)
    tokenize = tokenizer("ContextTiny")
    captions = ["a red circle beside a blue square", "two green triangles on the left"] * 2
    ids = tokenize(captions)
    spans = torch.tensor([[[1, 4], [6, 9]], [[1, 4], [0, 0]]] * 2)
    batch = {
        "reference_image": torch.rand(4, 3, 64, 64),
        "caption_ids": ids,
        "np_spans": spans,
        "np_mask": spans[..., 1] > 0,
    }
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=3e-3)
    losses, keys = [], set()
    for _ in range(12):
        out = module(batch)
        keys.add(tuple(sorted(out)))
        loss = sum(value for name, value in out.items() if name.endswith("_loss"))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert len(keys) == 1
    assert losses[-1] < losses[0]
    assert -1.0 <= float(out["phi/cosine"].detach()) <= 1.0  # a cosine of unit vectors
    assert 0.0 <= float(out["phi_loss"].detach()) <= 2.0
    if objective == "image":
        assert "concept_loss" in out


def test_a_dollar_in_the_text_never_becomes_a_second_slot() -> None:
    tokenize = tokenizer("ContextTiny")
    ids = tokenize([fill_template("a photo of $ that {caption}", "Costs under $20 and $5")])
    assert int((ids == placeholder_id(tokenize)).sum()) == 1


def test_methods_with_towers_of_other_image_inputs_are_refused() -> None:
    from training.evaluation.methods import MethodContext, MethodError

    context = MethodContext(config=None, device=torch.device("cpu"), split=None, backbone="ContextTiny")
    context.check_inputs("phi", "ContextTiny")  # the same inputs
    with pytest.raises(MethodError, match="phi: its towers \\(ViT-B-32, 224 px\\)"):
        context.check_inputs("phi", "ViT-B-32")


def test_phi_and_cvsi_share_one_pass_of_phis_image_tower_per_batch(network, monkeypatch) -> None:
    from training.evaluation.methods import GalleryBatch, QueryBatch
    from training.evaluation.methods.base import own_image_embedding

    calls = []
    encode = network.backbone.encode_image
    monkeypatch.setattr(network.backbone, "encode_image", lambda images: calls.append(len(images)) or encode(images))
    images = torch.rand(2, 3, 64, 64)
    query = QueryBatch(None, images, torch.zeros(2, 77, dtype=torch.long), texts=["a", "b"])
    first, second = own_image_embedding(network, query), own_image_embedding(network, query)
    assert first is second and calls == [2]
    own_image_embedding(network, GalleryBatch(None, images))  # another batch: its own pass
    assert calls == [2, 2]
