"""`ConTextObjective`: the network plus its losses, as one module the training engine wraps.

`forward(batch)` returns a flat dict of tensors. Keys ending in `_loss` are summed by the loop into the loss it
backpropagates: `contrastive_loss`, `cc_loss` (already multiplied by `loss.lambda_cc`) and, with
`loss.lambda_grounding`, `grounding_loss`. Everything else is logged: `cc/raw` (the unweighted Text-CC loss),
`cc/nps`, what the gap is made of (`cc/ctx_level`, `cc/iso_level`, `cc/shape_gap`, `cc/below`: see
`concept_consistency_parts`, against whichever target `loss.cc_target` names; `cc/ctx_budget`, `cc/iso_budget`: see
`attention_budget`, with the isolated maps), `grounding/raw` (the unweighted preservation term),
`contrastive/accuracy` and the contrastive directions.

The paper's Text-CC compares each phrase's in-context map with its isolated map under an L1 (`loss.cc_target`
`isolated`, `loss.cc_form` `l1`). The departures (`training.objectives.config.LossConfig`) swap the target for the
towers' own phrase map, read from a frozen copy of the towers the run started from, and the L1 for a KL over patches.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from training.model.config import ModelConfig
from training.model.context_cir import ConTextCIR, build_model
from training.model.towers import ClipBackbone, build_backbone
from training.objectives.concept_consistency import (
    at_context_mass,
    attention_budget,
    concept_consistency_loss,
    concept_consistency_parts,
    grounding_preservation_loss,
    over_patches,
    relative_maps,
    spatial_consistency_loss,
)
from training.objectives.config import LossConfig
from training.objectives.contrastive import ContrastiveLoss


class ConTextObjective(nn.Module):
    """L = L_contrastive + lambda_cc * L_cc (+ lambda_grounding * L_grounding) over one micro-batch (the contrastive
    negatives span all ranks)."""

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
        self.cc_target = loss_config.cc_target
        self.cc_form = loss_config.cc_form
        self.cc_temperature = loss_config.cc_temperature
        self.lambda_grounding = loss_config.lambda_grounding
        # The towers the run started from, rebuilt from the config (so a resumed run gets the same ones), frozen.
        # Kept in a tuple, outside the module tree: not trained, not checkpointed, not moved by the engine.
        self._starting: tuple[ClipBackbone, ...] = ()
        if loss_config.needs_starting_towers:
            starting = build_backbone(model_config).eval()
            starting.requires_grad_(False)
            self._starting = (starting,)

    def starting_towers(self, like: torch.Tensor) -> ClipBackbone:
        """The frozen starting towers, on the device (and in the dtype) of the trained towers' parameter `like`."""
        towers = self._starting[0]
        weight = towers.clip.visual.conv1.weight
        if (weight.device, weight.dtype) != (like.device, like.dtype):
            towers.to(device=like.device, dtype=like.dtype)
        return towers

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Losses and metrics of a reader batch (see CONVENTIONS' batch dict); extra keys are ignored."""
        with_cc = self.lambda_cc > 0 and "np_spans" in batch
        with_grounding = self.lambda_grounding > 0 and "np_ids" in batch
        names = ("np_spans", "np_mask", "np_ids") if with_cc else ("np_mask", "np_ids") if with_grounding else ()
        concepts = {name: batch[name] for name in names}
        # `layout`: the batch's sizes read on the host before the copy (training.model.batch_layout): no host syncs.
        layout = batch.get("layout")
        outputs = self.model(
            batch["reference_image"],
            batch["caption_ids"],
            batch["target_image"],
            **concepts,
            layout=layout,
            isolated=with_cc and self.cc_target == "isolated",
            reference_patches=with_grounding,
        )
        contrastive = self.contrastive(outputs["fused/query"], outputs["img/target"], outputs["img/reference"])
        result = {
            "contrastive_loss": contrastive.pop("loss"),
            **{f"contrastive/{name}": value for name, value in contrastive.items()},
        }
        starting_cosines = None
        if (with_cc and self.cc_target == "towers") or with_grounding:
            starting_cosines = self._starting_cosines(batch, layout)
        if with_cc and "fused/np_maps" in outputs:
            result.update(self._concept_consistency(batch, outputs, starting_cosines))
        if with_grounding:
            backbone = self.model.backbone
            rows, length = (layout.np_rows, layout.np_length) if layout is not None else (None, None)
            cosines = backbone.phrase_cosines(
                outputs["img/reference_patches"], batch["np_ids"], batch["np_mask"], rows, length
            )
            raw = grounding_preservation_loss(cosines, starting_cosines, batch["np_mask"], self.cc_temperature)
            result["grounding_loss"] = self.lambda_grounding * raw
            result["grounding/raw"] = raw.detach()
        return result

    @torch.no_grad()
    def _starting_cosines(self, batch: dict[str, Any], layout: Any) -> torch.Tensor:
        """(B, N, P) the starting towers' phrase cosines over the batch's reference images."""
        towers = self.starting_towers(self.model.backbone.clip.visual.conv1.weight)
        patches = towers.encode_image(batch["reference_image"]).patches_after_ln_post
        rows, length = (layout.np_rows, layout.np_length) if layout is not None else (None, None)
        return towers.phrase_cosines(patches, batch["np_ids"], batch["np_mask"], rows, length)

    def _concept_consistency(
        self, batch: dict[str, Any], outputs: dict[str, torch.Tensor], starting_cosines: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        in_context, mask = outputs["fused/np_maps"], batch["np_mask"]
        result = {}
        if self.cc_target == "isolated":
            target = outputs["fused/np_maps_isolated"]
            spans = batch["np_spans"]
            lengths = (spans[..., 1] - spans[..., 0]).clamp(min=0) * mask
            result.update(attention_budget(in_context, target, lengths))
            distribution = over_patches(target.float())
        else:
            distribution = torch.softmax(starting_cosines.float() / self.cc_temperature, dim=-1)
            target = at_context_mass(distribution, in_context)
        if self.cc_relative:
            in_context, target = relative_maps(in_context.float()), relative_maps(target.float())
        if self.cc_form == "l1":
            raw = concept_consistency_loss(in_context, target, mask, self.cc_epsilon)
        else:
            raw = spatial_consistency_loss(in_context, distribution, mask)
        result["cc_loss"] = self.lambda_cc * raw
        result["cc/raw"] = raw.detach()
        result["cc/nps"] = mask.sum().float()
        result.update(concept_consistency_parts(in_context, target, mask, self.cc_epsilon))
        return result
