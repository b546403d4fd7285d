"""TisCIR (IJCAI 2025): MSMP pseudo-words of a structured template, and FGIA attention over each image's own tokens.

The CLIP towers stay frozen. Two stages of `train.objective: tiscir` (`methods.tiscir.stage`):

- `msmp`: three small MLPs each turn a caption's CLIP text embedding into one pseudo-word; the template
  "a photo of $ , $ , $" read through the frozen text tower with those words should embed like the caption. The
  MLPs see the embedding plus Gaussian noise of a random per-sample scale (as LinCIR), so that at query time they
  also read embeddings that are not exactly on the caption manifold.
- `fgia`: MSMP frozen; FGIA refines the reference image's CLIP embedding with attention over that image's own
  tokens, queried by the MSMP text part, so that image_weight x refined image + text_weight x text part retrieves the
  target (InfoNCE, negatives over every rank).

The released FGIA attends across the batch (one image's output depends on the other images it is batched with);
here the softmax of every sample runs over its own tokens only, so a query is the same in any batch.

The network is the frozen towers plus MSMP and FGIA; checkpoints hold it whole, so the fgia stage starts from the
msmp stage's `model.safetensors` through `model.init_from`, and the eval job loads one file.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shards import model_inputs
from training.model.config import ModelConfig
from training.model.towers import build_backbone
from training.objectives.contrastive import ContrastiveLoss
from training.zeroshot.config import TisCIRConfig
from training.zeroshot.pseudo_words import encode_with_pseudo_words, placeholder_id

SLOTS = 3
"""Pseudo-words of the structured template, one per MLP (objects, attributes, the rest of the scene)."""


class MSMP(nn.Module):
    """Multi-semantic mapping: three MLPs, each Linear -> GELU -> Dropout -> Linear, one pseudo-word each."""

    def __init__(self, embed_dim: int, text_width: int, hidden_mult: int = 4, dropout: float = 0.5) -> None:
        super().__init__()
        hidden = hidden_mult * embed_dim
        self.mlps = nn.ModuleList(
            nn.Sequential(nn.Linear(embed_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, text_width))
            for _ in range(SLOTS)
        )

    def forward(self, text_embedding: torch.Tensor) -> torch.Tensor:
        """(B, embed_dim) CLIP text embeddings -> (B, 3, text_width) pseudo-words, in the template's `$` order."""
        return torch.stack([mlp(text_embedding) for mlp in self.mlps], dim=1)


class FGIA(nn.Module):
    """Fine-grained image attention: one text-conditioned query per sample over that sample's own image tokens.

    The query is the (normalised) MSMP text part projected to the image width, so it picks the regions the text
    names; keys and values are the image's tokens after a LayerNorm (the tower hands them over before `ln_post`, at
    the residual stream's scale). The attended vector is projected to the embedding width and added to the CLIP image
    embedding. That projection starts at zero, so training starts from the plain CLIP embedding.
    """

    def __init__(self, image_width: int, embed_dim: int, heads: int = 4) -> None:
        super().__init__()
        if image_width % heads:
            raise ValueError(f"methods.tiscir.fgia_heads={heads} must divide the image width {image_width}")
        self.heads = heads
        self.token_norm = nn.LayerNorm(image_width)
        self.query = nn.Linear(embed_dim, image_width)
        self.key = nn.Linear(image_width, image_width)
        self.value = nn.Linear(image_width, image_width)
        self.output = nn.Linear(image_width, embed_dim)
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.output.bias)

    def forward(
        self, image_tokens: torch.Tensor, image_embedding: torch.Tensor, text_part: torch.Tensor
    ) -> torch.Tensor:
        """(B, embed_dim) refined image embeddings, not normalised.

        Args:
            image_tokens: (B, P, image_width), each image's own tokens (`ImageFeatures.tokens`).
            image_embedding: (B, embed_dim) the CLIP image embedding of the same images.
            text_part: (B, embed_dim) the MSMP text part of each sample's modification text.
        """
        batch, length, width = image_tokens.shape
        head_dim = width // self.heads
        tokens = self.token_norm(image_tokens.to(self.token_norm.weight.dtype))
        query = self.query(F.normalize(text_part, dim=-1).to(tokens.dtype))
        # (B, heads, 1, head_dim) against (B, heads, P, head_dim): the softmax runs over one sample's P tokens only.
        query = query.view(batch, self.heads, 1, head_dim)
        keys = self.key(tokens).view(batch, length, self.heads, head_dim).transpose(1, 2)
        values = self.value(tokens).view(batch, length, self.heads, head_dim).transpose(1, 2)
        attended = F.scaled_dot_product_attention(query, keys, values).reshape(batch, width)
        return image_embedding + self.output(attended).to(image_embedding.dtype)


class TisCIRNetwork(nn.Module):
    """The frozen towers, MSMP and FGIA; makes composed queries and gallery embeddings."""

    def __init__(self, model_config: ModelConfig, config: TisCIRConfig) -> None:
        super().__init__()
        self.backbone = build_backbone(model_config)
        self.backbone.requires_grad_(False)
        embed_dim = self.backbone.embed_dim
        self.msmp = MSMP(embed_dim, self.backbone.text_width, config.hidden_mult, config.dropout)
        self.fgia = FGIA(self.backbone.image_width, embed_dim, config.fgia_heads)
        self.config = config
        tokenize = model_inputs.tokenizer(model_config.backbone)
        self.placeholder = placeholder_id(tokenize)
        template = tokenize([config.template])
        # The text tower is causal: cutting the PAD after end-of-text changes no state up to it, and saves work.
        length = int((template[0] != 0).nonzero().max()) + 1
        self.register_buffer("template_ids", template[:, :length], persistent=False)

    def caption_embedding(self, caption_ids: torch.Tensor) -> torch.Tensor:
        """(B, D) the frozen text tower's CLIP embeddings of captions (B, T); no gradient."""
        with torch.no_grad():
            return self.backbone.text_embedding(self.backbone.encode_text(caption_ids), caption_ids)

    def template_embedding(self, words: torch.Tensor) -> torch.Tensor:
        """(B, D) the template's embedding with pseudo-words (B, 3, text_width) in its `$` slots."""
        ids = self.template_ids.expand(words.shape[0], -1)
        return encode_with_pseudo_words(self.backbone, ids, words, self.placeholder)

    def text_part(self, caption_ids: torch.Tensor) -> torch.Tensor:
        """(B, D) the MSMP text part of modification texts (B, T): their pseudo-words read through the template."""
        embedding = self.caption_embedding(caption_ids)
        return self.template_embedding(self.msmp(embedding.to(self.msmp.mlps[0][0].weight.dtype)))

    def query_embedding(self, reference_images: torch.Tensor, caption_ids: torch.Tensor) -> torch.Tensor:
        """(B, D) normalised composed queries: image_weight x refined reference + text_weight x text part."""
        text = self.text_part(caption_ids)
        reference = self.backbone.encode_image(reference_images)
        image = self.fgia(reference.tokens, reference.embedding, text)
        mixed = self.config.image_weight * F.normalize(image.float(), dim=-1)
        mixed = mixed + self.config.text_weight * F.normalize(text.float(), dim=-1)
        return F.normalize(mixed, dim=-1)

    def gallery_embedding(self, images: torch.Tensor) -> torch.Tensor:
        """(B, D) the CLIP image embeddings of gallery images, not normalised."""
        return self.backbone.encode_image(images).embedding


class TisCIRObjective(nn.Module):
    """One stage of TisCIR training; only that stage's module has requires_grad (and so reaches the optimizer)."""

    def __init__(self, model_config: ModelConfig, config: TisCIRConfig) -> None:
        super().__init__()
        self.model = TisCIRNetwork(model_config, config)
        self.config = config
        trained = self.model.msmp if config.stage == "msmp" else self.model.fgia
        frozen = self.model.fgia if config.stage == "msmp" else self.model.msmp
        trained.requires_grad_(True)
        frozen.requires_grad_(False)
        self.contrastive = ContrastiveLoss(config.temperature, reference_negatives=False, symmetric=False)

    def train(self, mode: bool = True) -> TisCIRObjective:
        """Train mode for the stage's module only: the frozen towers and the frozen MSMP keep their dropout off."""
        super().train(mode)
        self.model.backbone.eval()
        if self.config.stage == "fgia":
            self.model.msmp.eval()
        return self

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Losses and metrics of a reader batch; extra keys are ignored."""
        if self.config.stage == "msmp":
            return self._msmp(batch["caption_ids"])
        return self._fgia(batch["reference_image"], batch["caption_ids"], batch["target_image"])

    def _msmp(self, caption_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        network = self.model
        embedding = network.caption_embedding(caption_ids).float()
        # Per-coordinate noise at a random fraction (U(0, noise_std)) of the embedding's RMS coordinate size.
        scale = torch.rand(len(embedding), 1, device=embedding.device) * self.config.noise_std
        rms = embedding.norm(dim=-1, keepdim=True) / embedding.shape[-1] ** 0.5
        noisy = embedding + torch.randn_like(embedding) * scale * rms
        words = network.msmp(noisy.to(network.msmp.mlps[0][0].weight.dtype))
        sentence = network.template_embedding(words).float()
        cosine = F.cosine_similarity(sentence, embedding, dim=-1)
        return {"msmp_loss": (1 - cosine).mean(), "tiscir/cosine": cosine.mean().detach()}

    def _fgia(
        self, reference_images: torch.Tensor, caption_ids: torch.Tensor, target_images: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        network = self.model
        query = network.query_embedding(reference_images, caption_ids)
        with torch.no_grad():
            target = F.normalize(network.gallery_embedding(target_images).float(), dim=-1)
        terms = self.contrastive(query, target)
        return {"fgia_loss": terms["loss"], "tiscir/accuracy": terms["accuracy"]}
