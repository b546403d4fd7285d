"""ConText-CIR: the trained fusion model's composed query against its gallery encoding (`model.target_encoding`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from training.evaluation.methods.base import CLIP_IMAGE_SPACE, GalleryBatch, Method, QueryBatch, register_method

if TYPE_CHECKING:  # config validation reads the registry's names: keep torch out of that import
    import torch


class ConTextCIRMethod(Method):
    name = "context"
    summary = "the checkpoint's fusion model: f(reference, text) against CLIP image embeddings (or f(image, ''))"

    def gallery_space(self, model: torch.nn.Module) -> str:
        # With `clip` target encoding the gallery is CLIP's image embedding, which the baselines share.
        return CLIP_IMAGE_SPACE if model.target_encoding == "clip" else self.name

    def encode_query(self, batch: QueryBatch) -> torch.Tensor:
        return batch.views["fused/query"]

    def encode_gallery(self, batch: GalleryBatch) -> torch.Tensor:
        return batch.model.gallery_embedding(batch.features)


CONTEXT_CIR = register_method(ConTextCIRMethod())
