"""TisCIR: MSMP's structured-template text part and FGIA's refined reference image, mixed with configured weights
(`methods.tiscir.image_weight` / `text_weight`), against the CLIP image embeddings of its frozen towers.

The network is a `train.objective: tiscir` checkpoint of the fgia stage (`methods.tiscir.checkpoint`).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from training.evaluation.methods.base import (
    GalleryBatch,
    Method,
    MethodContext,
    MethodError,
    QueryBatch,
    register_method,
)

if TYPE_CHECKING:  # config validation reads the registry's names: keep torch out of that import
    import torch


class TisCIRMethod(Method):
    name = "tiscir"
    summary = "TisCIR: FGIA-refined reference image + MSMP template text part (methods.tiscir)"

    def __init__(self) -> None:
        self._loaded: tuple | None = None
        self.network = None
        self.tokenize = None

    def gallery_space(self, model: torch.nn.Module) -> str:
        return "tiscir_towers"

    def prepare(self, context: MethodContext) -> None:
        from safetensors import SafetensorError

        from shards import model_inputs
        from training.zeroshot.networks import load_method_network, resolve_trained

        settings = context.config.methods.tiscir
        if not settings.checkpoint:
            raise MethodError(
                "set methods.tiscir.checkpoint (a run of `python launch/train.py --config configs/tiscir_tiny.yaml`, "
                "e.g. runs/tiscir_tiny/checkpoints/latest) to score tiscir"
            )
        try:
            checkpoint = resolve_trained(settings.checkpoint)
            key = (str(checkpoint), str(context.device), settings.image_weight, settings.text_weight)
            network = load_method_network(checkpoint, "tiscir", context.device) if self._loaded != key else None
        except (OSError, ValueError, RuntimeError, SafetensorError) as error:
            raise MethodError(f"tiscir: cannot load {settings.checkpoint}: {error}") from error
        if network is not None:
            if network.config.stage != "fgia":
                raise MethodError(
                    f"tiscir: {checkpoint} is of the {network.config.stage} stage, whose FGIA is untrained; score "
                    "the fgia stage's run (configs/tiscir_tiny.yaml)"
                )
            # Retrieval weights are read from the eval config, so a trained network is scored under any mix.
            weights = {"image_weight": settings.image_weight, "text_weight": settings.text_weight}
            network.config = dataclasses.replace(network.config, **weights)
            self.network, self.tokenize = network, model_inputs.tokenizer(network.backbone_name)
            self._loaded = key
        context.check_inputs("tiscir", self.network.backbone_name)

    def encode_query(self, batch: QueryBatch) -> torch.Tensor:
        ids = self.tokenize(batch.texts).to(batch.reference_images.device)
        return self.network.query_embedding(batch.reference_images, ids)

    def encode_gallery(self, batch: GalleryBatch) -> torch.Tensor:
        return self.network.gallery_embedding(batch.images)


TISCIR = register_method(TisCIRMethod())
