"""The ConText-CIR network: open_clip towers, the cross-attention fusion head, attention pooling, projection.

A composed query is f(I, T): the reference image's tokens (CLS + patch grid) attend to the caption's token states
through the fusion head; a Set Transformer PMA (one learned seed) pools the fused tokens and a linear map projects
them into CLIP's joint space, where they are compared with gallery embeddings (`clip`: CLIP's image embedding;
`fused_empty`: the same query path with an empty caption).

`forward` is the training pass. It returns a flat dict: `fused/query`, `img/target`, `img/reference` (all L2-
normalised) and, when NP spans are given, the in-context NP maps `fused/np_maps` (with gradient) and, with the
NPs' own ids too, the isolated maps `fused/np_maps_isolated` (without). On request it also returns the references'
patch tokens after `ln_post`, `img/reference_patches`. The isolated pass is the efficient one: it reuses the
reference image's patch tokens (detached), encodes every NP of the batch in one text-tower call at the NPs' own
short length, and stops at the last block's attention weights.

Images come in as the loaders hand them over, uint8 pixels (normalised on the device by `ClipBackbone`), or as
images already normalised on the host (float).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from shards.model_inputs import tokenizer
from training.model.batch_layout import BatchLayout
from training.model.config import ModelConfig
from training.model.fusion import (
    ConceptColumns,
    FusionHead,
    TextKeys,
    attention_eager,
    merge_heads,
    split_heads,
    trim_padding,
)
from training.model.towers import ClipBackbone, ImageFeatures, build_backbone

logger = logging.getLogger(__name__)
ISOLATED_CHUNK_TOKENS = (4096, 262144)
"""Patch tokens per chunk of the isolated NP pass (CPU, GPU): cache-sized on CPU, memory-bounded on GPU."""


class AttentionPooler(nn.Module):
    """Set Transformer PMA with one seed: H = LN(S + MHA(S, X)), out = LN(H + FFN(H))."""

    def __init__(self, width: int, heads: int, ffn_mult: int) -> None:
        super().__init__()
        self.heads = heads
        self.seed = nn.Parameter(torch.randn(1, 1, width) * width**-0.5)
        self.q_proj = nn.Linear(width, width)
        self.kv_proj = nn.Linear(width, 2 * width)
        self.out_proj = nn.Linear(width, width)
        self.attention_norm = nn.LayerNorm(width)
        self.ffn = nn.Sequential(nn.Linear(width, ffn_mult * width), nn.GELU(), nn.Linear(ffn_mult * width, width))
        self.ffn_norm = nn.LayerNorm(width)

    def forward(self, tokens: torch.Tensor, eager: bool = False) -> torch.Tensor:
        """(B, W) pooled from tokens (B, Q, W)."""
        seed = self.seed.to(tokens.dtype).expand(tokens.shape[0], -1, -1)
        query = split_heads(self.q_proj(seed), self.heads)
        key, value = (split_heads(part, self.heads) for part in self.kv_proj(tokens).chunk(2, dim=-1))
        if eager:
            every_token = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
            attended = attention_eager(query, key, value, every_token)[0]
        else:
            attended = F.scaled_dot_product_attention(query, key, value)
        pooled = self.attention_norm(seed + self.out_proj(merge_heads(attended)))
        return self.ffn_norm(pooled + self.ffn(pooled))[:, 0]


class ConTextCIR(nn.Module):
    """Composed-query encoder over an open_clip backbone."""

    def __init__(self, backbone: ClipBackbone, config: ModelConfig, empty_caption_ids: torch.Tensor) -> None:
        super().__init__()
        self.backbone = backbone
        width = backbone.image_width
        layers, heads, ffn_mult = config.fusion_layers, config.fusion_heads, config.ffn_mult
        self.fusion = FusionHead(width, backbone.text_width, layers, heads, ffn_mult, config.text_kv_layernorm)
        self.pooler = AttentionPooler(width, config.fusion_heads, config.ffn_mult)
        self.query_projection = nn.Linear(width, backbone.embed_dim, bias=False)
        nn.init.normal_(self.query_projection.weight, std=width**-0.5)
        self.eager = config.attention == "eager"
        self.target_encoding = config.target_encoding
        self.trim_text = True
        """Cut caption PAD after the batch's longest caption (exact); the released-code benchmark path turns it off."""
        self.register_buffer("empty_caption_ids", empty_caption_ids.reshape(1, -1), persistent=False)

    @property
    def patch_grid(self) -> tuple[int, int]:
        """(gh, gw) of the image tower's patch grid; concept maps have gh*gw entries."""
        return self.backbone.patch_grid

    @property
    def switches(self) -> dict[str, bool]:
        """The `model` switches this network was built with that its weights alone may not reveal."""
        return {
            "text_kv_layernorm": isinstance(self.fusion.blocks[0].text_norm, nn.LayerNorm),
            "image_tokens_after_ln_post": self.backbone.tokens_after_ln_post,
        }

    # --- pieces -----------------------------------------------------------------------------------------------

    def _text(self, caption_ids: torch.Tensor, length: int | None = None) -> tuple[torch.Tensor, TextKeys]:
        """(trimmed ids, their keys for the fusion); trimming trailing PAD is exact (causal tower, masked keys).

        `length`: the trimmed length, read on the host beforehand (`BatchLayout`); without it it is read here.
        """
        ids = trim_padding(caption_ids, length) if self.trim_text else caption_ids
        return ids, TextKeys.of(self.backbone.encode_text(ids), ids)

    def _concepts(
        self, np_spans: torch.Tensor, np_mask: torch.Tensor, key_length: int, width: int | None = None
    ) -> ConceptColumns:
        """In-context NP columns; the maps leave out the image tokens before the patch grid."""
        prefix = self.backbone.image_prefix_tokens
        return ConceptColumns.from_spans(np_spans, np_mask, key_length, prefix, width)

    def _query(
        self, image_tokens: torch.Tensor, keys: TextKeys, concepts: ConceptColumns | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Normalised query embedding (B, D) and, with `concepts`, in-context NP maps (B, N, patches)."""
        fused, maps = self.fusion(image_tokens, keys, concepts, self.eager)
        query = self.query_projection(self.pooler(fused, self.eager))
        return F.normalize(query, dim=-1), maps

    def gallery_embedding(self, features: ImageFeatures) -> torch.Tensor:
        """Normalised gallery embedding (per `model.target_encoding`) of images already through the image tower."""
        if self.target_encoding == "clip":
            return F.normalize(features.embedding, dim=-1)
        _, keys = self._text(self.empty_caption_ids)
        return self._query(features.tokens, keys.expand(features.tokens.shape[0]))[0]

    # --- the public encoders ----------------------------------------------------------------------------------

    def encode_query(self, reference_image: torch.Tensor, caption_ids: torch.Tensor) -> torch.Tensor:
        """(B, D) L2-normalised composed-query embedding f(reference_image, caption)."""
        _, keys = self._text(caption_ids)
        return self._query(self.backbone.encode_image(reference_image).tokens, keys)[0]

    def encode_query_views(
        self,
        reference_image: torch.Tensor,
        caption_ids: torch.Tensor,
        np_spans: torch.Tensor | None = None,
        np_mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The composed query, both single-modality baselines and, with NP spans, the concept maps, in one pass.

        Returns `fused/query` (= encode_query), `img/reference` (= encode_image_clip of the reference) and
        `txt/caption` (= encode_text_clip of the caption), each (B, D) and L2-normalised, and with `np_spans` and
        `np_mask` also `fused/np_maps` (= concept_maps, (B, N, gh, gw)) from the same fusion pass. The eval job
        needs all of them per query batch; separate encoders would run each tower and the fusion head again.
        """
        ids, keys = self._text(caption_ids)
        image = self.backbone.encode_image(reference_image)
        concepts = self._concepts(np_spans, np_mask, ids.shape[1]) if np_spans is not None else None
        query, maps = self._query(image.tokens, keys, concepts)
        views = {
            "fused/query": query,
            "img/reference": F.normalize(image.embedding, dim=-1),
            "txt/caption": F.normalize(self.backbone.text_embedding(keys.states, ids), dim=-1),
        }
        if maps is not None:
            views["fused/np_maps"] = maps.reshape(*maps.shape[:2], *self.patch_grid)
        return views

    def encode_gallery(self, images: torch.Tensor) -> torch.Tensor:
        """(B, D) L2-normalised gallery/target embedding, per `model.target_encoding`."""
        return self.gallery_embedding(self.backbone.encode_image(images))

    def encode_image_clip(self, images: torch.Tensor) -> torch.Tensor:
        """(B, D) normalised CLIP image embedding (the image-only baseline)."""
        return F.normalize(self.backbone.encode_image(images).embedding, dim=-1)

    def encode_text_clip(self, caption_ids: torch.Tensor) -> torch.Tensor:
        """(B, D) normalised CLIP text embedding (the text-only baseline)."""
        ids = trim_padding(caption_ids)
        return F.normalize(self.backbone.text_embedding(self.backbone.encode_text(ids), ids), dim=-1)

    def concept_maps(
        self, reference_image: torch.Tensor, caption_ids: torch.Tensor, np_spans: torch.Tensor, np_mask: torch.Tensor
    ) -> torch.Tensor:
        """(B, N, gh, gw) in-context NP maps over the patch grid (CLS excluded), averaged over tokens/heads/layers."""
        ids, keys = self._text(caption_ids)
        tokens = self.backbone.encode_image(reference_image).tokens
        maps = self.fusion.concept_maps(tokens, keys, self._concepts(np_spans, np_mask, ids.shape[1]), self.eager)
        return maps.reshape(*maps.shape[:2], *self.patch_grid)

    @torch.no_grad()
    def isolated_concept_maps(
        self,
        patch_tokens: torch.Tensor,
        np_ids: torch.Tensor,
        np_mask: torch.Tensor,
        layout: BatchLayout | None = None,
    ) -> torch.Tensor:
        """(B, N, P) maps of each NP encoded alone, over the given reference patch tokens (B, P, W); no gradient.

        Every real NP of the batch goes through one text-tower call at the NPs' own length and one fusion pass
        (queries: its reference image's patch tokens; nothing from the image tower runs again). `layout` gives the
        real NPs and their length as read on the host; without it they are read here (host syncs on a GPU).
        """
        batch, count, _ = np_ids.shape
        patches = patch_tokens.shape[1]
        maps = torch.zeros(batch * count, patches, dtype=torch.float32, device=patch_tokens.device)
        if layout is None:
            rows = np_mask.reshape(-1).nonzero().squeeze(1)
            found, length, width = rows.numel(), None, None
        else:
            rows, found, length, width = layout.np_rows, layout.np_count, layout.np_length, layout.isolated_width
        if not found:
            return maps.reshape(batch, count, patches)
        ids = trim_padding(np_ids.reshape(batch * count, -1)[rows], length)
        keys = TextKeys.of(self.backbone.encode_text(ids), ids)
        concepts = ConceptColumns.isolated(ids, width=width)  # queries are patch tokens only: no prefix rows
        images = torch.div(rows, count, rounding_mode="floor")
        # Chunks of NPs keep the fusion activations of one chunk in cache (CPU) or bounded in memory (GPU).
        step = max(1, ISOLATED_CHUNK_TOKENS[patch_tokens.device.type == "cuda"] // patches)
        for start in range(0, found, step):
            chunk = slice(start, start + step)
            isolated = self.fusion.concept_maps(patch_tokens[images[chunk]], keys[chunk], concepts[chunk], self.eager)
            maps[rows[chunk]] = isolated[:, 0].float()
        return maps.reshape(batch, count, patches)

    def forward(
        self,
        reference_image: torch.Tensor,
        caption_ids: torch.Tensor,
        target_image: torch.Tensor,
        np_spans: torch.Tensor | None = None,
        np_mask: torch.Tensor | None = None,
        np_ids: torch.Tensor | None = None,
        layout: BatchLayout | None = None,
        isolated: bool = True,
        reference_patches: bool = False,
    ) -> dict[str, torch.Tensor]:
        """The training pass; see the module docstring for the returned keys.

        `layout`: the batch's sizes read on the host before it moved to the device (`training.model.batch_layout`).
        With it the pass never waits for the GPU; without it, it reads them from the tensors.
        `isolated`: run the isolated NP pass when NP ids are given (False: a loss that does not read it).
        `reference_patches`: also return `img/reference_patches`, the references' patch tokens after `ln_post`
        (with gradient), for the towers' own phrase maps (`ClipBackbone.phrase_cosines`).
        """
        if not self.trim_text:
            layout = None  # the released-code path keeps 77 tokens: the layout's sizes are not its own
        if reference_image.dtype != target_image.dtype:
            # `cat` would promote uint8 pixels to float and the tower would take them for normalised images.
            raise TypeError(
                f"reference_image ({reference_image.dtype}) and target_image ({target_image.dtype}) must both be "
                "uint8 pixels or both normalised floats"
            )
        # One image-tower call for both image sets: the tower treats samples independently. uint8 pixels are
        # concatenated and normalised once, on the device (`ClipBackbone.image_inputs`).
        images = self.backbone.encode_image(torch.cat([reference_image, target_image]))
        # `chunk` rather than slicing: its backward concatenates the two gradients instead of zero-filling and
        # adding two full-size buffers.
        (reference_tokens, target_tokens), (reference_embedding, target_embedding) = (
            images.tokens.chunk(2),
            images.embedding.chunk(2),
        )
        reference = ImageFeatures(reference_tokens, reference_embedding)
        target = ImageFeatures(target_tokens, target_embedding)
        ids, keys = self._text(caption_ids, layout.caption_length if layout is not None else None)
        with_maps = np_spans is not None and np_mask is not None and np_mask.shape[1] > 0
        width = layout.concept_width if layout is not None else None
        concepts = self._concepts(np_spans, np_mask, ids.shape[1], width) if with_maps else None
        query, maps = self._query(reference.tokens, keys, concepts)
        outputs = {
            "fused/query": query,
            "img/target": self.gallery_embedding(target),
            "img/reference": self.gallery_embedding(reference),
        }
        if with_maps:
            outputs["fused/np_maps"] = maps
        if reference_patches:
            outputs["img/reference_patches"] = images.patches_after_ln_post.chunk(2)[0]
        if with_maps and np_ids is not None and isolated:
            patches = reference.tokens[:, self.backbone.image_prefix_tokens :].detach()
            outputs["fused/np_maps_isolated"] = self.isolated_concept_maps(patches, np_ids, np_mask, layout)
        return outputs


def build_model(config: ModelConfig, device: str | torch.device = "cpu") -> ConTextCIR:
    """The ConText-CIR network for `config`: random init, an open_clip pretrained tag, or `model.weights_file`.

    `model.init_from` (a full ConText-CIR checkpoint) is not read here; `training.model.weights` does that.

    Raises:
        ValueError: unknown backbone or tag, a weights file that does not fit, an incompatible tower.
        training.model.towers.PretrainedWeightsUnavailable: a pretrained tag that is neither cached nor downloadable.
    """
    backbone = build_backbone(config, device)
    backbone.set_grad_checkpointing(config.grad_checkpointing)
    empty = tokenizer(config.backbone)([""]).to(torch.device(device))
    with torch.device(device):
        model = ConTextCIR(backbone, config, empty)
    if config.compile:
        model.compile()  # compiles `forward` in place; parameter names (and checkpoints) stay unchanged
    return model


def rebuild_model(saved: ModelConfig, weights_file: str | Path, device: str | torch.device = "cpu") -> ConTextCIR:
    """The trained network from its recorded `model` section and a `model.safetensors`, in eval mode on `device`.

    The weights file holds every parameter, so nothing is fetched or initialised from elsewhere: the pretrained
    tag, weights file and init checkpoint of the training run are dropped, after the tower flags they implied are
    resolved (configs recorded before those flags existed lack them).

    Raises:
        FileNotFoundError: no weights file.
        ValueError: the weights do not fit the recorded architecture.
    """
    from training.model.towers import with_tower_flags
    from training.model.weights import load_model_weights

    config = dataclasses.replace(
        with_legacy_switches(with_tower_flags(saved), weights_file),
        pretrained=None,
        weights_file=None,
        init_from=None,
        compile=False,
        grad_checkpointing=False,
    )
    model = build_model(config)
    load_model_weights(model, weights_file)
    return model.to(device).eval()


def with_legacy_switches(saved: ModelConfig, weights_file: str | Path) -> ModelConfig:
    """`saved` with the switches of a network trained before `model.text_kv_layernorm` and
    `model.image_tokens_after_ln_post` existed turned on, as that code always built it; otherwise `saved` itself.

    Such a checkpoint's recorded section reads both switches at their defaults (off), yet its weights hold the
    blocks' text LayerNorm, which a network built with `text_kv_layernorm` off never has: that pair marks it.
    """
    from safetensors import safe_open

    if saved.text_kv_layernorm or not Path(weights_file).is_file():
        return saved
    with safe_open(str(weights_file), framework="pt") as weights:
        legacy = any(".text_norm." in name for name in weights.keys())
    if not legacy:
        return saved
    logger.warning(
        "%s predates model.text_kv_layernorm and model.image_tokens_after_ln_post: rebuilding with both on",
        weights_file,
    )
    return dataclasses.replace(saved, text_kv_layernorm=True, image_tokens_after_ln_post=True)
