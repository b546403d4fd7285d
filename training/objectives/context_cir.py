"""`ConTextObjective`: the network plus its losses, as one module the training engine wraps.

`forward(batch)` returns a flat dict of tensors. Keys ending in `_loss` are summed by the loop into the loss it
backpropagates: `contrastive_loss` and `cc_loss` (already multiplied by `loss.lambda_cc`). Everything else is
logged: `cc/raw` (the unweighted Text-CC loss), `cc/nps`, what the gap is made of (`cc/ctx_level`, `cc/iso_level`,
`cc/shape_gap`, `cc/below`: see `concept_consistency_parts`; `cc/ctx_budget`, `cc/iso_budget`: see
`attention_budget`), `contrastive/accuracy` and the contrastive directions.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from training.model.config import ModelConfig
from training.model.context_cir import ConTextCIR, build_model
from training.objectives.concept_consistency import (
    attention_budget,
    concept_consistency_loss,
    concept_consistency_parts,
    relative_maps,
)
from training.objectives.config import LossConfig
from training.objectives.contrastive import ContrastiveLoss


class ConTextObjective(nn.Module):
    """L = L_contrastive + lambda_cc * L_cc over one micro-batch (the contrastive negatives span all ranks)."""

    def __init__(self, model_config: ModelConfig, loss_config: LossConfig, model: ConTextCIR | None = None) -> None:
        super().__init__()
        self.model = model if model is not None else build_model(model_config)
        self.contrastive = ContrastiveLoss(
            loss_config.temperature,
            loss_config.reference_negatives,
            loss_config.symmetric,
            loss_config.learnable_temperature,
        )
        self.lambda_cc = loss_config.lambda_cc
        self.cc_epsilon = loss_config.cc_epsilon
        self.cc_relative = loss_config.cc_maps == "relative"

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Losses and metrics of a reader batch (see CONVENTIONS' batch dict); extra keys are ignored."""
        concepts = {}
        if self.lambda_cc > 0 and "np_spans" in batch:
            concepts = {name: batch[name] for name in ("np_spans", "np_mask", "np_ids")}
        # `layout`: the batch's sizes read on the host before the copy (training.model.batch_layout): no host syncs.
        layout = batch.get("layout")
        outputs = self.model(
            batch["reference_image"], batch["caption_ids"], batch["target_image"], **concepts, layout=layout
        )
        contrastive = self.contrastive(outputs["fused/query"], outputs["img/target"], outputs["img/reference"])
        result = {
            "contrastive_loss": contrastive.pop("loss"),
            **{f"contrastive/{name}": value for name, value in contrastive.items()},
        }
        if "fused/np_maps" in outputs:
            in_context, isolated = outputs["fused/np_maps"], outputs["fused/np_maps_isolated"]
            spans = batch["np_spans"]
            lengths = (spans[..., 1] - spans[..., 0]).clamp(min=0) * batch["np_mask"]
            result.update(attention_budget(in_context, isolated, lengths))
            if self.cc_relative:
                in_context, isolated = relative_maps(in_context.float()), relative_maps(isolated.float())
            raw = concept_consistency_loss(in_context, isolated, batch["np_mask"], self.cc_epsilon)
            result["cc_loss"] = self.lambda_cc * raw
            result["cc/raw"] = raw.detach()
            result["cc/nps"] = batch["np_mask"].sum().float()
            result.update(concept_consistency_parts(in_context, isolated, batch["np_mask"], self.cc_epsilon))
        return result
