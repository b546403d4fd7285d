"""The Text Concept-Consistency loss: each noun phrase's in-context attention map against its isolated map."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def relative_maps(maps: torch.Tensor) -> torch.Tensor:
    """(B, N, P) maps divided by their mean over patches (each then averages 1; an all-zero padding row stays 0)."""
    return maps / maps.mean(dim=-1, keepdim=True).clamp(min=1e-12)


def concept_consistency_loss(
    in_context: torch.Tensor, isolated: torch.Tensor, np_mask: torch.Tensor, epsilon: float
) -> torch.Tensor:
    """Text-CC: mean over real NPs of the mean over patches of ReLU(|ctx - iso| - epsilon).

    Args:
        in_context: (B, N, P) maps of each NP inside its caption.
        isolated: (B, N, P) maps of each NP encoded alone (no gradient is taken through them).
        np_mask: (B, N) True for real NPs.
        epsilon: slack below which a difference costs nothing.

    Returns:
        A scalar; 0 (still attached to the graph) when the batch has no NP.
    """
    gap = F.relu((in_context.float() - isolated.detach().float()).abs() - epsilon).mean(dim=-1)
    weights = np_mask.to(gap.dtype)
    return (gap * weights).sum() / weights.sum().clamp(min=1.0)


@torch.no_grad()
def concept_consistency_parts(
    in_context: torch.Tensor, isolated: torch.Tensor, np_mask: torch.Tensor, epsilon: float
) -> dict[str, torch.Tensor]:
    """What the Text-CC gap is made of, for the logs (no gradient). Each value is a mean over real NPs.

    - `cc/ctx_level`, `cc/iso_level`: the mean over patches of the in-context and of the isolated map. A map is the
      attention a patch pays to the phrase's tokens, so a phrase read alone (few tokens to share the attention)
      sits higher than the same phrase inside its caption whatever the image shows.
    - `cc/shape_gap`: the mean over patches of |(ctx - its mean) - (iso - its mean)|, the part of the gap that says
      where the object is.
    - `cc/below`: of the (phrase, patch) pairs the loss acts on (|ctx - iso| > epsilon), the share with ctx < iso.
      The L1 gradient is sign(ctx - iso) on those patches, so at 1.0 it raises every patch alike: the loss then
      lifts the phrase's attention overall and carries nothing about where the object is.
    """
    context, target = in_context.float(), isolated.float()
    weights = np_mask.to(context.dtype)
    count = weights.sum().clamp(min=1.0)
    context_level, target_level = context.mean(dim=-1), target.mean(dim=-1)
    shape = ((context - context_level[..., None]) - (target - target_level[..., None])).abs().mean(dim=-1)
    difference = context - target
    active = (difference.abs() > epsilon) & np_mask[..., None]
    below = (active & (difference < 0)).sum() / active.sum().clamp(min=1)
    return {
        "cc/ctx_level": (context_level * weights).sum() / count,
        "cc/iso_level": (target_level * weights).sum() / count,
        "cc/shape_gap": (shape * weights).sum() / count,
        "cc/below": below.to(context.dtype),
    }


@torch.no_grad()
def attention_budget(
    in_context: torch.Tensor, isolated: torch.Tensor, np_lengths: torch.Tensor
) -> dict[str, torch.Tensor]:
    """How much of a patch's attention a caption's phrases get in context, and how much their isolated maps ask for.

    A map is the mean over a phrase's tokens of the attention a patch pays to each, so map x token count is the
    phrase's share of that patch's attention. Summed over a caption's phrases and averaged over patches, then over
    the captions that have a phrase: `cc/ctx_budget` and `cc/iso_budget`. A patch's attention over its caption sums
    to 1, so an `iso_budget` above 1 is a target the in-context maps cannot all meet.

    Args:
        in_context, isolated: (B, N, P) maps.
        np_lengths: (B, N) token count of each phrase, 0 for padding.
    """
    lengths = np_lengths.to(torch.float32)
    captions = (lengths.sum(dim=1) > 0).to(torch.float32)
    count = captions.sum().clamp(min=1.0)

    def budget(maps: torch.Tensor) -> torch.Tensor:
        return ((maps.float().mean(dim=-1) * lengths).sum(dim=1) * captions).sum() / count

    return {"cc/ctx_budget": budget(in_context), "cc/iso_budget": budget(isolated)}
