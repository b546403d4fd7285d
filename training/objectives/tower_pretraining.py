"""`TowerPretrainObjective`: CLIP-style pretraining of the open_clip towers on described images (DESIGN section 14).

A sample is an image, its scene description as the caption, and the description's noun phrases with the boxes they
name (`np_boxes`, NaN where unknown). Three terms, each a key ending in `_loss`:

- `description_loss`: InfoNCE of image embeddings against description embeddings, both directions, negatives
  gathered over every rank (the contrastive loss of the ConText objective without reference negatives);
- `region_loss`: InfoNCE of box regions against phrases over the rank's micro-batch. A region's embedding is the
  mean of its in-box patch tokens, each passed through `ln_post` and the image projection (the towers' dense
  features). Phrases with the same text are all positives of a region, so "the top left" of two images is never a
  negative of itself;
- `phrase_image_loss`: a phrase alone against the micro-batch's image embeddings; every image holding a phrase with
  the same text is a positive, so "a small red circle" retrieves the images with a small red circle;
- `map_loss`: each phrase's cosine map over the dense features, as a softmax over the patches, is pulled toward a
  uniform distribution over its in-box patches (cross-entropy). This is what makes a phrase encoded alone point at
  its region, the grounding Text-CC later transfers into the fused context.

The network is the whole ConText-CIR model, so checkpoints, eval and export read it unchanged, but the fusion head,
pooler and query projection are frozen and unused: only the towers learn.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from training.model.config import ModelConfig
from training.model.context_cir import ConTextCIR, build_model
from training.model.towers import ClipBackbone
from training.objectives.contrastive import ContrastiveLoss
from training.objectives.pretrain_config import PretrainConfig


def dense_image_features(backbone: ClipBackbone, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """((B, gh*gw, D) patch tokens after `ln_post` and the projection, (B, D) CLIP image embedding); not normalised."""
    visual = backbone.clip.visual
    hidden = visual.transformer(visual._embeds(backbone.image_inputs(images)))  # uint8 pixels normalised there
    pooled, patches = visual._pool(hidden)  # open_clip's own pooling applies ln_post to both
    if visual.proj is None:
        return patches, pooled
    return patches @ visual.proj, pooled @ visual.proj


def patches_in_boxes(boxes: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(M, gh*gw) bool: which patch centres lie inside each box (M, 4) of (x0, y0, x1, y1) fractions.

    A box too small to hold any patch centre takes the patch under its own centre, so every phrase has a region.
    """
    grid_h, grid_w = grid
    centres_y = (torch.arange(grid_h, device=boxes.device, dtype=boxes.dtype) + 0.5) / grid_h
    centres_x = (torch.arange(grid_w, device=boxes.device, dtype=boxes.dtype) + 0.5) / grid_w
    x0, y0, x1, y1 = (boxes[:, i, None] for i in range(4))
    inside_y = (centres_y >= y0) & (centres_y <= y1)  # (M, gh)
    inside_x = (centres_x >= x0) & (centres_x <= x1)  # (M, gw)
    inside = (inside_y[:, :, None] & inside_x[:, None, :]).reshape(len(boxes), -1)
    row = ((y0 + y1) / 2 * grid_h).long().clamp(0, grid_h - 1).squeeze(1)
    column = ((x0 + x1) / 2 * grid_w).long().clamp(0, grid_w - 1).squeeze(1)
    centre = F.one_hot(row * grid_w + column, grid_h * grid_w).bool()
    empty = ~inside.any(dim=1, keepdim=True)
    return torch.where(empty, centre, inside)


class TowerPretrainObjective(nn.Module):
    """L = L_description + region_weight * L_region + phrase_image_weight * L_phrase_image + map_weight * L_map."""

    def __init__(self, model_config: ModelConfig, config: PretrainConfig, model: ConTextCIR | None = None) -> None:
        super().__init__()
        self.model = model if model is not None else build_model(model_config)
        for name, parameter in self.model.named_parameters():
            if not name.startswith("backbone."):
                parameter.requires_grad_(False)
        self.description = ContrastiveLoss(config.temperature, reference_negatives=False, symmetric=True)
        self.config = config

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Losses and metrics of a reader batch whose captions are descriptions; extra keys are ignored."""
        backbone = self.model.backbone
        dense, image_embedding = dense_image_features(backbone, batch["reference_image"])
        ids = batch["caption_ids"]
        text_embedding = backbone.text_embedding(backbone.encode_text(ids), ids)
        terms = self.description(F.normalize(text_embedding, dim=-1), F.normalize(image_embedding, dim=-1))
        result = {"description_loss": terms["loss"], "pretrain/description_accuracy": terms["accuracy"]}
        boxes = batch.get("np_boxes")
        if boxes is None:
            return result
        grounded = batch["np_mask"] & torch.isfinite(boxes).all(dim=-1)  # (B, N)
        if not bool(grounded.any()):  # the same keys on every rank: the loop sums them in one collective
            zero = dense.sum() * 0.0
            names = (
                "region_loss",
                "map_loss",
                "phrase_image_loss",
                "pretrain/region_raw",
                "pretrain/map_raw",
                "pretrain/phrase_image_raw",
                "pretrain/pointing",
            )
            return {**result, **{name: zero for name in names}, "pretrain/phrases": zero.detach()}
        rows = grounded.nonzero()[:, 0]
        phrase_ids = batch["np_ids"][grounded]  # (M, np_length), each NP tokenized alone
        phrases = F.normalize(backbone.text_embedding(backbone.encode_text(phrase_ids), phrase_ids), dim=-1)
        inside = patches_in_boxes(boxes[grounded].float(), backbone.patch_grid).to(dense.dtype)  # (M, P)
        features = F.normalize(dense, dim=-1)[rows]  # (M, P, D)
        similarity = torch.einsum("mpd,md->mp", features, phrases)
        in_box = inside / inside.sum(dim=1, keepdim=True)
        map_loss = -(F.log_softmax(similarity / self.config.map_temperature, dim=1) * in_box).sum(dim=1).mean()
        regions = F.normalize(torch.einsum("mpd,mp->md", features, in_box), dim=-1)
        same_text = (phrase_ids[:, None, :] == phrase_ids[None, :, :]).all(dim=-1).float()
        targets = same_text / same_text.sum(dim=1, keepdim=True)
        logits = regions @ phrases.T / self.config.temperature
        region_loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
        present = (phrase_ids[:, None, None, :] == batch["np_ids"][None]).all(dim=-1) & batch["np_mask"][None]
        holds = present.any(dim=-1).float()  # (M, B): image b has a phrase with phrase m's text
        image_logits = phrases @ F.normalize(image_embedding, dim=-1).T / self.config.temperature
        phrase_image_loss = F.cross_entropy(image_logits, holds / holds.sum(dim=1, keepdim=True))
        pointing = similarity.argmax(dim=1)
        hits = inside.gather(1, pointing[:, None]).squeeze(1) > 0
        return {
            **result,
            "region_loss": self.config.region_weight * region_loss,
            "map_loss": self.config.map_weight * map_loss,
            "phrase_image_loss": self.config.phrase_image_weight * phrase_image_loss,
            "pretrain/region_raw": region_loss.detach(),
            "pretrain/phrase_image_raw": phrase_image_loss.detach(),
            "pretrain/map_raw": map_loss.detach(),
            "pretrain/pointing": hits.float().mean().detach(),
            "pretrain/phrases": grounded.sum().float(),
        }
