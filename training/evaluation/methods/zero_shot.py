"""Zero-shot baselines on the same CLIP towers, without the fusion head: image only, text only, and their sum.

Each ranks CLIP image embeddings of the gallery. They show what the fusion head adds over the towers it starts from.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from training.evaluation.methods.base import CLIP_IMAGE_SPACE, GalleryBatch, Method, QueryBatch, register_method

if TYPE_CHECKING:  # config validation reads the registry's names: keep torch out of that import
    import torch


class _ClipGallery(Method):
    def gallery_space(self, model: torch.nn.Module) -> str:
        return CLIP_IMAGE_SPACE

    def encode_gallery(self, batch: GalleryBatch) -> torch.Tensor:
        return batch.features.embedding


class ImageOnly(_ClipGallery):
    name = "image_only"
    summary = "CLIP image embedding of the reference"

    def encode_query(self, batch: QueryBatch) -> torch.Tensor:
        return batch.views["img/reference"]


class TextOnly(_ClipGallery):
    name = "text_only"
    summary = "CLIP text embedding of the query text"

    def encode_query(self, batch: QueryBatch) -> torch.Tensor:
        return batch.views["txt/caption"]


class ImageTextSum(_ClipGallery):
    name = "image_text_sum"
    summary = "normalised sum of the image-only and text-only embeddings"

    def encode_query(self, batch: QueryBatch) -> torch.Tensor:
        import torch.nn.functional as F

        image = F.normalize(batch.views["img/reference"].float(), dim=-1)
        text = F.normalize(batch.views["txt/caption"].float(), dim=-1)
        return image + text


IMAGE_ONLY = register_method(ImageOnly())
TEXT_ONLY = register_method(TextOnly())
IMAGE_TEXT_SUM = register_method(ImageTextSum())
