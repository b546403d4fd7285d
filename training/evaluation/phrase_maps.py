"""The maps of a query batch's grounded noun phrases over the reference patch grid, beside the query pass.

Three map kinds (`training.evaluation.grounding.MAP_KINDS`), each (B, N, gh, gw):

- `context`: `fused/np_maps`, read from the query pass itself (`QueryBatch.views`);
- `isolated`: `ConTextCIR.isolated_concept_maps`, each noun phrase encoded alone over the reference's patch tokens,
  what the Text-CC loss pulls the in-context map towards. Its ids are the shard builder's rows (start token, the
  phrase's own BPE ids from `shards.builder.tokens.CaptionTokenizer`, end token);
- `tower`: the towers' own dense map, the cosine between each patch token after `ln_post` and the image projection
  and the phrase's CLIP text embedding, as a softmax over the patches (see `tower_maps`). It needs no fusion head,
  so it grounds a checkpoint whose head was never trained.

The reference patch tokens come from the query pass itself (module hooks record the image tokens the fusion head
reads and the image tower's states), so the image tower still runs once per batch. The text tower runs twice more
per batch, on the phrases alone at their short length.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from training.evaluation.methods.base import QueryBatch

logger = logging.getLogger(__name__)

TOWER_MAP_TEMPERATURE = 0.1
"""Softmax temperature over patches of the tower map's cosines: the tower pretraining's phrase-map default
(`pretrain.map_temperature`). Pointing and AUC read only the order, which the softmax keeps; box share needs a
non-negative mass, which a raw cosine is not."""


class PhraseTokens(NamedTuple):
    """A grounded noun phrase's tokens: its `[start, end)` in the caption ids and its ids encoded alone."""

    start: int
    end: int
    ids: tuple[int, ...]
    """Start token, the phrase's own BPE ids, end token: a row of the shards' `np_ids`, unpadded."""


@dataclass
class PhraseInputs:
    """A batch's grounded noun phrases as the model takes them; a row without a phrase is masked out."""

    spans: torch.Tensor
    """(B, N, 2) int64 `[start, end)` in the caption ids."""
    mask: torch.Tensor
    """(B, N) bool: the phrase has tokens (False past the 77-token context or for padding)."""
    ids: torch.Tensor
    """(B, N, L) int64: each phrase encoded alone, zero padded to the batch's longest."""

    def to(self, device: torch.device) -> PhraseInputs:
        return PhraseInputs(*(tensor.to(device, non_blocking=True) for tensor in (self.spans, self.mask, self.ids)))


def phrase_inputs(rows: Sequence[Sequence[PhraseTokens | None]]) -> tuple[PhraseInputs | None, int]:
    """(the batch's PhraseInputs, or None when no phrase has tokens; phrases without tokens).

    Args:
        rows: per query, each grounded phrase's tokens, None where the phrase has none.
    """
    width = max((len(row) for row in rows), default=0)
    length = max((len(tokens.ids) for row in rows for tokens in row if tokens is not None), default=1)
    spans = torch.zeros(len(rows), width, 2, dtype=torch.int64)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    ids = torch.zeros(len(rows), width, length, dtype=torch.int64)
    dropped = 0
    for row, phrases in enumerate(rows):
        for column, tokens in enumerate(phrases):
            if tokens is None:
                dropped += 1
                continue
            spans[row, column] = torch.tensor((tokens.start, tokens.end))
            ids[row, column, : len(tokens.ids)] = torch.tensor(tokens.ids)
            mask[row, column] = True
    return (PhraseInputs(spans, mask, ids) if mask.any() else None), dropped


@dataclass
class QueryPassStates:
    """What the query pass computed that the isolated and tower maps reuse, one entry per call."""

    image_states: list[torch.Tensor] = field(default_factory=list)
    """Outputs of the image tower's transformer (before open_clip's pooling and `ln_post`)."""
    fusion_tokens: list[torch.Tensor] = field(default_factory=list)
    """Image tokens (prefix + patch grid) the fusion head received: the model's own choice of tokens."""


@contextlib.contextmanager
def query_pass_states(model: torch.nn.Module) -> Iterator[QueryPassStates]:
    """Record the image tower's states and the fusion head's image tokens of every call made inside the block."""
    states = QueryPassStates()
    visual_transformer = model.backbone.clip.visual.transformer
    hooks = [
        visual_transformer.register_forward_hook(lambda _module, _inputs, output: states.image_states.append(output)),
        model.fusion.register_forward_pre_hook(lambda _module, inputs: states.fusion_tokens.append(inputs[0])),
    ]
    try:
        yield states
    finally:
        for hook in hooks:
            hook.remove()


@functools.cache
def _warn_second_image_pass() -> None:
    logger.warning("the query pass did not expose its image-tower states; grounding runs the image tower again")


def reference_patches(
    model: torch.nn.Module, states: QueryPassStates, images: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(patch tokens the fusion head read, patch tokens after `ln_post`), each (B, gh*gw, width), of the references.

    The first feed the isolated maps, as training's isolated pass reuses the in-context pass's tokens; the second,
    open_clip's own pooling of the tower states, feed the tower maps. Both come from the query pass's states; should
    that pass not have run the tower and the head exactly once on these images, the tower runs again (said once).
    """
    backbone = model.backbone
    batch = images.shape[0]
    seen = (states.image_states, states.fusion_tokens)
    if not all(len(found) == 1 and found[0].shape[0] == batch for found in seen):
        _warn_second_image_pass()
        with query_pass_states(model) as states:
            states.fusion_tokens.append(backbone.encode_image(images).tokens)
    hidden, tokens = states.image_states[-1], states.fusion_tokens[-1]
    return tokens[:, backbone.image_prefix_tokens :], backbone.clip.visual._pool(hidden)[1]


def tower_maps(
    backbone: torch.nn.Module,
    patches: torch.Tensor,
    np_ids: torch.Tensor,
    np_mask: torch.Tensor,
    temperature: float = TOWER_MAP_TEMPERATURE,
) -> torch.Tensor:
    """(B, N, gh*gw) float32: softmax over patches of cos(projected patch token, phrase text embedding) / temperature.

    Args:
        backbone: the model's `ClipBackbone`.
        patches: (B, P, width) reference patch tokens after `ln_post`.
        np_ids: (B, N, L) each phrase's ids encoded alone; rows outside `np_mask` are ignored (uniform maps).
        np_mask: (B, N) which phrases are real.
    """
    cosines = backbone.phrase_cosines(patches, np_ids, np_mask)
    return torch.softmax(cosines / temperature, dim=-1)


def phrase_maps(batch: QueryBatch, states: QueryPassStates, inputs: PhraseInputs) -> dict[str, torch.Tensor]:
    """Map kind -> (B, N, gh, gw) maps of the batch's phrases, after the query pass recorded `states`."""
    model = batch.model
    shape = (*inputs.mask.shape, *model.patch_grid)
    context = batch.views["fused/np_maps"].reshape(shape)
    fusion_patches, tower_patches = reference_patches(model, states, batch.reference_images)
    return {
        "context": context,
        "isolated": model.isolated_concept_maps(fusion_patches, inputs.ids, inputs.mask).reshape(shape),
        "tower": tower_maps(model.backbone, tower_patches, inputs.ids, inputs.mask).reshape(shape),
    }
