"""Textual inversion (SEARLE / LinCIR family): phi maps a CLIP embedding to a pseudo-word token embedding.

The query of a composed pair is the frozen text tower's embedding of "a photo of $ that {caption}" with `$` the
pseudo-word phi makes of the reference image. phi trains on this engine with the towers frozen, from images alone
(`image`, SEARLE's objective) or from captions alone (`text`, LinCIR's):

- `image`: the pseudo-sentence "a photo of $" should embed like its image (InfoNCE over every rank's images), and
  like "a photo of <c>" for the concept word c that CLIP finds nearest the image (SEARLE's pull towards real words,
  with a class vocabulary in place of GPT-written phrases);
- `text`: every noun phrase of a caption is replaced by one pseudo-word, which phi makes from the caption's own
  embedding plus noise of a random scale; the masked sentence should embed like the caption. The noise is what lets
  a phi trained on text read image embeddings at query time.

The network is the frozen towers plus phi, so checkpoints hold everything the eval job needs.
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
from training.zeroshot.config import PhiConfig
from training.zeroshot.pseudo_words import encode_with_pseudo_words, fill_template, placeholder_id


class Phi(nn.Module):
    """The mapping network: Linear -> GELU -> Dropout, twice, then Linear (SEARLE's and LinCIR's layout)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, dropout: float = 0.5) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_dim, hidden_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, hidden_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, output_dim),
        )

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        """(B, input_dim) -> (B, output_dim) pseudo-word token embeddings."""
        return self.layers(embedding)


def frozen_backbone(model_config: ModelConfig):
    """The open_clip towers of `model`, every parameter fixed."""
    backbone = build_backbone(model_config)
    backbone.requires_grad_(False)
    return backbone


class PhiNetwork(nn.Module):
    """The frozen towers and phi; builds composed queries from (reference image, modification text)."""

    def __init__(self, model_config: ModelConfig, config: PhiConfig) -> None:
        super().__init__()
        self.backbone = frozen_backbone(model_config)
        embed_dim, width = self.backbone.embed_dim, self.backbone.text_width
        self.phi = Phi(embed_dim, config.hidden_dim or 4 * embed_dim, width, config.dropout)
        self.config = config
        self.tokenize = model_inputs.tokenizer(model_config.backbone)
        self.placeholder = placeholder_id(self.tokenize)

    def pseudo_word(self, embedding: torch.Tensor) -> torch.Tensor:
        """(B, 1, text_width) the pseudo-word of each (B, D) CLIP embedding (normalised first unless configured)."""
        source = F.normalize(embedding.float(), dim=-1) if self.config.normalise_input else embedding.float()
        return self.phi(source.to(self.phi.layers[0].weight.dtype)).unsqueeze(1)

    def query_embedding(self, image_embedding: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """(B, D) CLIP text embeddings of `methods.phi.template` holding each reference's pseudo-word and text."""
        device = image_embedding.device
        ids = self.tokenize([fill_template(self.config.template, text) for text in texts]).to(device)
        return encode_with_pseudo_words(self.backbone, ids, self.pseudo_word(image_embedding), self.placeholder)

    def text_embedding(self, texts: list[str]) -> torch.Tensor:
        """(B, D) the frozen text tower's embeddings of plain texts."""
        ids = self.tokenize(texts).to(self.phi.layers[0].weight.device)
        return self.backbone.text_embedding(self.backbone.encode_text(ids), ids)


def mask_noun_phrases(ids: torch.Tensor, spans: torch.Tensor, mask: torch.Tensor, placeholder: int) -> torch.Tensor:
    """Each caption (B, T) with every noun-phrase span [start, end) collapsed into one `placeholder` token, shifted
    left and padded with zeros; rows without a phrase come back unchanged."""
    rows = []
    for row_ids, row_spans, row_mask in zip(ids.tolist(), spans.tolist(), mask.tolist()):
        cuts = sorted((start, end) for (start, end), real in zip(row_spans, row_mask) if real and end > start)
        out, at = [], 0
        for start, end in cuts:
            if start < at:  # overlapping phrases: the first one holds the place
                continue
            out += row_ids[at:start] + [placeholder]
            at = end
        out += row_ids[at:]
        rows.append(out[: len(row_ids)] + [0] * (len(row_ids) - len(out)))
    return torch.tensor(rows, dtype=ids.dtype, device=ids.device)


class PhiObjective(nn.Module):
    """Trains phi with the towers frozen; `methods.phi.objective` picks the image or the text objective."""

    def __init__(self, model_config: ModelConfig, config: PhiConfig) -> None:
        super().__init__()
        self.model = PhiNetwork(model_config, config)
        self.config = config
        self.contrastive = ContrastiveLoss(config.temperature, reference_negatives=False, symmetric=True)
        self._concepts: torch.Tensor | None = None

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        if self.config.objective == "image":
            return self._image_objective(batch["reference_image"])
        return self._text_objective(batch["caption_ids"], batch["np_spans"], batch["np_mask"])

    def _concept_sentences(self, device: torch.device) -> torch.Tensor:
        """(C, D) normalised embeddings of `train_template` with each concept word (computed once)."""
        if self._concepts is None or self._concepts.device != device:
            template = self.config.train_template
            with torch.no_grad():
                texts = [template.replace("$", concept) for concept in self.config.concepts]
                self._concepts = F.normalize(self.model.text_embedding(texts).float(), dim=-1).to(device)
        return self._concepts

    def _image_objective(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        network = self.model
        with torch.no_grad():
            image = F.normalize(network.backbone.encode_image(images).embedding.float(), dim=-1)
        ids = network.tokenize([self.config.train_template] * len(images)).to(images.device)
        words = network.pseudo_word(image)
        sentence = F.normalize(encode_with_pseudo_words(network.backbone, ids, words, network.placeholder), dim=-1)
        terms = self.contrastive(sentence.float(), image)
        result = {"phi_loss": terms["loss"], "phi/accuracy": terms["accuracy"]}
        result["phi/cosine"] = (sentence.float() * image).sum(dim=1).mean().detach()
        if self.config.concepts and self.config.reg_weight > 0:
            concepts = self._concept_sentences(images.device)
            nearest = concepts[(image @ concepts.T).argmax(dim=1)]
            regulariser = (1 - (sentence.float() * nearest).sum(dim=1)).mean()
            result["concept_loss"] = self.config.reg_weight * regulariser
            result["phi/concept_raw"] = regulariser.detach()
        return result

    def _text_objective(self, ids: torch.Tensor, spans: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        network = self.model
        with torch.no_grad():
            states = network.backbone.encode_text(ids)
            caption = F.normalize(network.backbone.text_embedding(states, ids).float(), dim=-1)
            scale = torch.rand(len(ids), 1, device=ids.device) * self.config.noise_std
            noisy = caption + scale * torch.randn_like(caption) / caption.shape[1] ** 0.5
        masked = mask_noun_phrases(ids, spans, mask, network.placeholder)
        slots = masked == network.placeholder
        word = network.pseudo_word(noisy)  # (B, 1, W): one pseudo-word for every phrase of its caption
        tokens = network.backbone.token_embedding(masked)
        tokens = torch.where(slots.unsqueeze(-1), word.to(tokens.dtype).expand_as(tokens), tokens)
        states = network.backbone.encode_text(masked, token_embeddings=tokens)
        sentence = F.normalize(network.backbone.text_embedding(states, masked).float(), dim=-1)
        has_phrase = slots.any(dim=1).float()
        cosine = (sentence * caption).sum(dim=1)
        loss = ((1 - cosine) * has_phrase).sum() / has_phrase.sum().clamp(min=1)
        return {
            "phi_loss": loss,
            "phi/cosine": (cosine * has_phrase).sum().detach() / has_phrase.sum().clamp(min=1),
            "phi/masked_share": has_phrase.mean().detach(),
        }
