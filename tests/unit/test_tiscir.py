"""TisCIR: MSMP pseudo-words, FGIA attention per sample, and both training stages on a tiny random backbone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shards import model_inputs
from training.model.config import ModelConfig
from training.zeroshot.config import TisCIRConfig
from training.zeroshot.tiscir_net import FGIA, MSMP, TisCIRNetwork, TisCIRObjective

TINY = ModelConfig(backbone="ContextTiny", fusion_layers=1)
CAPTIONS = [
    "a small red circle at the top left",
    "two blue squares and a green triangle",
    "a large yellow star in the middle",
    "remove the purple square and make it bigger",
]


def caption_ids(texts: list[str] = CAPTIONS) -> torch.Tensor:
    return model_inputs.tokenizer(TINY.backbone)(texts)


def fake_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Images of distinct random colours and textures, so that a random tower tells them apart."""
    generator = torch.Generator().manual_seed(seed)
    size = len(CAPTIONS)

    def images() -> torch.Tensor:
        colours = torch.rand(size, 3, 1, 1, generator=generator)
        return colours + torch.randn(size, 3, 64, 64, generator=generator) * torch.rand(
            size, 1, 1, 1, generator=generator
        )

    return {"reference_image": images(), "target_image": images(), "caption_ids": caption_ids()}


def randomise_output(fgia: FGIA) -> None:
    """FGIA starts as the identity on the CLIP embedding; a random output projection makes the tokens matter."""
    with torch.no_grad():
        nn.init.normal_(fgia.output.weight, std=0.5)


def test_fgia_output_of_an_image_does_not_depend_on_the_rest_of_the_batch() -> None:
    torch.manual_seed(0)
    fgia = FGIA(image_width=32, embed_dim=16, heads=4).eval()
    randomise_output(fgia)
    tokens, embedding, text = torch.randn(5, 9, 32), torch.randn(5, 16), torch.randn(5, 16)
    others_tokens, others_embedding, others_text = torch.randn(5, 9, 32), torch.randn(5, 16), torch.randn(5, 16)
    batch_b = (
        torch.cat([tokens[:1], others_tokens[1:]]),
        torch.cat([embedding[:1], others_embedding[1:]]),
        torch.cat([text[:1], others_text[1:]]),
    )
    with torch.no_grad():
        in_a, in_b = fgia(tokens, embedding, text)[0], fgia(*batch_b)[0]
        alone = fgia(tokens[:1], embedding[:1], text[:1])[0]
        # Converse: the output does read the image's own tokens and the text, so the checks above can fail.
        own_tokens_changed = fgia(torch.cat([others_tokens[:1], tokens[1:]]), embedding, text)[0]
        own_text_changed = fgia(tokens, embedding, torch.cat([others_text[:1], text[1:]]))[0]
    torch.testing.assert_close(in_a, in_b, rtol=0, atol=1e-6)
    torch.testing.assert_close(in_a, alone, rtol=0, atol=1e-6)
    assert (own_tokens_changed - in_a).abs().max() > 1e-3
    assert (own_text_changed - in_a).abs().max() > 1e-3


def test_fgia_starts_at_the_clip_embedding() -> None:
    fgia = FGIA(image_width=32, embed_dim=16, heads=4)
    embedding = torch.randn(3, 16)
    assert torch.equal(fgia(torch.randn(3, 9, 32), embedding, torch.randn(3, 16)), embedding)
    with pytest.raises(ValueError, match="fgia_heads"):
        FGIA(image_width=30, embed_dim=16, heads=4)


def test_query_of_a_pair_does_not_depend_on_the_rest_of_the_batch() -> None:
    torch.manual_seed(0)
    network = TisCIRNetwork(TINY, TisCIRConfig(stage="fgia")).eval()
    randomise_output(network.fgia)
    batch_a, batch_b = fake_batch(0), fake_batch(1)
    images_b = torch.cat([batch_a["reference_image"][:1], batch_b["reference_image"][1:]])
    ids_b = torch.cat([batch_a["caption_ids"][:1], batch_a["caption_ids"][1:].flip(0)])
    with torch.no_grad():
        query_a = network.query_embedding(batch_a["reference_image"], batch_a["caption_ids"])
        query_b = network.query_embedding(images_b, ids_b)
        own_image_changed = network.query_embedding(batch_b["reference_image"], batch_a["caption_ids"])
    assert query_a.shape == (len(CAPTIONS), network.backbone.embed_dim)
    torch.testing.assert_close(query_a[0], query_b[0], rtol=0, atol=1e-6)
    assert (own_image_changed[0] - query_a[0]).abs().max() > 1e-4
    torch.testing.assert_close(query_a.norm(dim=-1), torch.ones(len(CAPTIONS)))


def test_msmp_makes_three_pseudo_words_that_steer_the_template() -> None:
    torch.manual_seed(0)
    msmp = MSMP(embed_dim=16, text_width=24, hidden_mult=2, dropout=0.5)
    assert msmp(torch.randn(5, 16)).shape == (5, 3, 24)
    assert len(msmp.mlps) == 3 and msmp.mlps[0][0].out_features == 32

    network = TisCIRNetwork(TINY, TisCIRConfig()).eval()
    assert int((network.template_ids == network.placeholder).sum()) == 3
    width = network.backbone.text_width
    words = torch.randn(2, 3, width)
    with torch.no_grad():
        first = network.template_embedding(words)
        again = network.template_embedding(words)
        changed = words.clone()
        changed[:, 1] = torch.randn(2, width)  # only the middle slot
        second = network.template_embedding(changed)
    assert first.shape == (2, network.backbone.embed_dim)
    assert torch.equal(first, again)
    assert (first - second).abs().max(dim=-1).values.min() > 1e-4


def test_network_state_is_the_same_in_both_stages() -> None:
    """The fgia stage starts from the msmp stage's checkpoint with a strict load of the same network."""
    msmp_stage = TisCIRObjective(TINY, TisCIRConfig(stage="msmp"))
    fgia_stage = TisCIRObjective(TINY, TisCIRConfig(stage="fgia"))
    state = msmp_stage.model.state_dict()
    assert "template_ids" not in state
    fgia_stage.model.load_state_dict(state, strict=True)
    assert torch.equal(fgia_stage.model.msmp.mlps[2][3].weight, msmp_stage.model.msmp.mlps[2][3].weight)


def stage_loss(objective: TisCIRObjective, batch: dict[str, torch.Tensor], key: str) -> float:
    """The loss in eval mode (no dropout) under a fixed seed (the same MSMP noise every time)."""
    objective.eval()
    torch.manual_seed(123)
    with torch.no_grad():
        loss = float(objective(batch)[key])
    objective.train()
    return loss


@pytest.mark.parametrize(
    ("stage", "trained", "keys"),
    [
        ("msmp", "model.msmp.", {"msmp_loss", "tiscir/cosine"}),
        ("fgia", "model.fgia.", {"fgia_loss", "tiscir/accuracy"}),
    ],
)
def test_stage_trains_only_its_part_and_lowers_its_loss(stage: str, trained: str, keys: set[str]) -> None:
    torch.manual_seed(0)
    objective = TisCIRObjective(TINY, TisCIRConfig(stage=stage, dropout=0.1, temperature=0.1))
    names = [name for name, parameter in objective.named_parameters() if parameter.requires_grad]
    assert names and all(name.startswith(trained) for name in names)
    trained_module = objective.model.msmp if stage == "msmp" else objective.model.fgia
    assert len(names) == len(list(trained_module.parameters()))

    objective.train()
    assert not objective.model.backbone.training
    assert objective.model.msmp.training == (stage == "msmp")

    batch = fake_batch()
    loss_key = f"{stage}_loss"
    before = stage_loss(objective, batch, loss_key)
    optimizer = torch.optim.AdamW([p for p in objective.parameters() if p.requires_grad], lr=1e-2)
    frozen_before = {name: p.clone() for name, p in objective.named_parameters() if not p.requires_grad}
    for _ in range(12):
        result = objective(batch)
        assert set(result) == keys
        assert all(value.dim() == 0 for value in result.values())
        optimizer.zero_grad()
        sum(value for name, value in result.items() if name.endswith("_loss")).backward()
        optimizer.step()
    after = stage_loss(objective, batch, loss_key)
    assert after < 0.9 * before, (before, after)
    assert all(torch.equal(p, frozen_before[name]) for name, p in objective.named_parameters() if not p.requires_grad)
