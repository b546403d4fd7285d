"""The authors' released Text-CC path, kept only as the baseline of `launch/bench.py step`.

Their code takes the in-context maps from the attention weights of the main forward (eager attention, caption at
the full 77 tokens) and gets each isolated map by calling the whole model again for every noun phrase: the image
tower on the reference image, the text tower on the NP padded to 77, every fusion block with its FFN, and the
pooler, all without gradient. The efficient path in `training.model.context_cir` computes the same loss; the tests hold both
to an independent oracle.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shards.model_inputs import CONTEXT_LENGTH
from training.model.context_cir import ConTextCIR
from training.model.fusion import ConceptColumns, TextKeys
from training.objectives.concept_consistency import concept_consistency_loss


@torch.no_grad()
def released_isolated_maps(
    model: ConTextCIR, reference_image: torch.Tensor, np_ids: torch.Tensor, np_mask: torch.Tensor
) -> torch.Tensor:
    """(B, N, P) isolated maps, one whole-model call per noun phrase that exists, NP ids padded to the context.

    The released code loops over a caption's noun phrases; here each slot's existing phrases run as one sub-batch
    (the images that have a phrase in that slot), so the cost grows with the phrases there are, as theirs does.
    """
    batch, count, length = np_ids.shape
    patches = model.patch_grid[0] * model.patch_grid[1]
    maps = torch.zeros(batch, count, patches, dtype=torch.float32, device=np_ids.device)
    for slot in range(count):
        rows = np_mask[:, slot].nonzero().squeeze(1)
        if not rows.numel():
            continue
        ids = F.pad(np_ids[rows, slot], (0, CONTEXT_LENGTH - length))
        tokens = model.backbone.encode_image(reference_image[rows]).tokens
        keys = TextKeys.of(model.backbone.encode_text(ids), ids)
        concepts = ConceptColumns.isolated(ids, query_prefix=model.backbone.image_prefix_tokens)
        fused, slot_maps = model.fusion(tokens, keys, concepts, eager=True)
        model.query_projection(model.pooler(fused, eager=True))  # the released call computes the full output
        maps[rows, slot] = slot_maps[:, 0].float()
    return maps


def released_step_outputs(objective, batch: dict) -> dict[str, torch.Tensor]:
    """`ConTextObjective.forward` with the released Text-CC path: eager attention weights, 77 tokens, re-runs."""
    model = objective.model
    saved = model.eager, model.trim_text
    model.eager, model.trim_text = True, False
    try:
        outputs = model(
            batch["reference_image"], batch["caption_ids"], batch["target_image"], batch["np_spans"], batch["np_mask"]
        )
        isolated = released_isolated_maps(model, batch["reference_image"], batch["np_ids"], batch["np_mask"])
    finally:
        model.eager, model.trim_text = saved
    contrastive = objective.contrastive(outputs["fused/query"], outputs["img/target"], outputs["img/reference"])
    raw = concept_consistency_loss(outputs["fused/np_maps"], isolated, batch["np_mask"], objective.cc_epsilon)
    return {"contrastive_loss": contrastive["loss"], "cc_loss": objective.lambda_cc * raw, "cc/raw": raw.detach()}
