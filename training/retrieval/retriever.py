"""The query and gallery encoders of a trained model, for code that uses it rather than trains it.

    retriever = load_bundle("bundles/demo")                           # training.retrieval.bundle
    gallery = retriever.encode_gallery(["a.jpg", "b.jpg"])            # (2, D) float32, L2-normalised
    query = retriever.encode_query("ref.jpg", "with a red roof")      # (D,)  float32, L2-normalised
    scores = gallery @ query

Embeddings are what the eval job computes for the same checkpoint: the same transform, tokenizer and encoders,
fp32 on CPU and bf16 autocast on CUDA, renormalised in float32 afterwards.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from training.evaluation.encode import autocast, resolve_device

if TYPE_CHECKING:
    from training.retrieval.manifest import BundleInfo

ImageLike = Image.Image | str | Path


class UnreadableImage(ValueError):
    """An image file that cannot be opened or decoded; the message names it."""


def open_image(source: ImageLike) -> Image.Image:
    """An RGB PIL image from a path or an image (which is converted, not copied, when already RGB)."""
    if isinstance(source, Image.Image):
        return source if source.mode == "RGB" else source.convert("RGB")
    try:
        with Image.open(source) as image:
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise UnreadableImage(f"cannot read image {source}: {error}") from error


class Retriever:
    """A trained ConText-CIR model with its preprocessing and tokenizer.

    Attributes:
        info: the bundle's manifest.
        model: the network in eval mode on `device`.
        transform: image -> (3, S, S) tensor, open_clip's inference transform for the backbone.
    """

    def __init__(self, model: torch.nn.Module, info: BundleInfo, device: torch.device) -> None:
        from shards.model_inputs import tokenizer

        self.model = model
        self.info = info
        self.device = device
        self.transform = info.preprocessing.transform()
        self._tokenize = tokenizer(info.tokenizer["backbone"])

    @classmethod
    def from_bundle(cls, directory: Path, info: BundleInfo, device: str = "auto") -> Retriever:
        from shards.model_inputs import tokenizer_name
        from training.model.config import ModelConfig
        from training.model.context_cir import rebuild_model
        from training.retrieval.manifest import WEIGHTS, BundleError

        known = {field.name for field in dataclasses.fields(ModelConfig)}
        unknown = sorted(set(info.model) - known)
        if unknown:
            raise BundleError(f"{directory}: model keys {unknown} are unknown to this code (a newer bundle?)")
        backbone = info.tokenizer["backbone"]
        if tokenizer_name(backbone) != info.tokenizer["name"]:
            raise BundleError(
                f"{directory}: trained with tokenizer {info.tokenizer['name']!r}, this open_clip gives "
                f"{tokenizer_name(backbone)!r} for {backbone!r}"
            )
        target = resolve_device(device)
        model = rebuild_model(ModelConfig(**info.model), directory / WEIGHTS, target)
        return cls(model, info, target)

    @property
    def bundle_hash(self) -> str:
        """The sha256 of the bundle's weights: the identity an index records."""
        return self.info.weights_sha256

    @property
    def embed_dim(self) -> int:
        return int(self.model.backbone.embed_dim)

    # --- preprocessing ------------------------------------------------------------------------------------------

    def pixels(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """(B, 3, S, S) float32 tensor of images (paths or PIL); raises UnreadableImage naming a bad file."""
        return torch.stack([self.transform(open_image(image)) for image in images])

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """(B, 77) int64 token ids, as the training shards and the eval job tokenize."""
        return self._tokenize(list(texts))

    # --- encoders -----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        """(B, D) float32 gallery embeddings of preprocessed images (`pixels`)."""
        with autocast(self.device):
            embeddings = self.model.encode_gallery(pixels.to(self.device, non_blocking=True))
        return _normalised(embeddings)

    def encode_gallery(self, images: Sequence[ImageLike], batch_size: int = 64) -> np.ndarray:
        """(N, D) float32 L2-normalised gallery embeddings of images (paths or PIL), in order."""
        chunks = [
            self.encode_pixels(self.pixels(images[start : start + batch_size]))
            for start in range(0, len(images), batch_size)
        ]
        return np.concatenate(chunks) if chunks else np.zeros((0, self.embed_dim), dtype=np.float32)

    @torch.no_grad()
    def encode_queries(self, images: Sequence[ImageLike], texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """(Q, D) float32 L2-normalised composed-query embeddings f(image, text), in order."""
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} reference images but {len(texts)} texts")
        chunks = []
        for start in range(0, len(images), batch_size):
            pixels = self.pixels(images[start : start + batch_size]).to(self.device, non_blocking=True)
            ids = self.tokenize(texts[start : start + batch_size]).to(self.device, non_blocking=True)
            with autocast(self.device):
                chunks.append(_normalised(self.model.encode_query(pixels, ids)))
        return np.concatenate(chunks) if chunks else np.zeros((0, self.embed_dim), dtype=np.float32)

    def encode_query(self, image: ImageLike, text: str) -> np.ndarray:
        """(D,) float32 L2-normalised composed-query embedding of one reference image and modification text."""
        return self.encode_queries([image], [text])[0]


def _normalised(embeddings: torch.Tensor) -> np.ndarray:
    return F.normalize(embeddings.float(), dim=-1).cpu().numpy()
