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


TINY = 1e-12
"""Floor of a mass before its logarithm: an all-zero (padding) map stays finite."""


def over_patches(maps: torch.Tensor) -> torch.Tensor:
    """(B, N, P) non-negative maps divided by their sum over patches: each a distribution (a zero row stays 0)."""
    return maps / maps.sum(dim=-1, keepdim=True).clamp(min=TINY)


def at_context_mass(distribution: torch.Tensor, in_context: torch.Tensor) -> torch.Tensor:
    """A target distribution over patches scaled to each in-context map's own mass (no gradient through either).

    The `l1` form against the `towers` target: the towers' map sums to 1 over patches, a fusion map sums to the
    attention its phrase gets, so unscaled the L1 would only push every patch's level down. At equal mass the
    difference is where the mass sits.
    """
    return distribution.detach().float() * in_context.detach().float().sum(dim=-1, keepdim=True)


def _mean_over_phrases(per_phrase: torch.Tensor, np_mask: torch.Tensor) -> torch.Tensor:
    weights = np_mask.to(per_phrase.dtype)
    return (per_phrase * weights).sum() / weights.sum().clamp(min=1.0)


def spatial_consistency_loss(in_context: torch.Tensor, target: torch.Tensor, np_mask: torch.Tensor) -> torch.Tensor:
    """The `spatial` form: mean over real NPs of KL(target || in-context map normalised over patches).

    Only where a phrase's attention goes is compared, not how much of it the phrase gets. The gradient of one
    phrase's term with respect to its map at patch p is 1/S - t_p/ctx_p (S the map's sum): it raises patches where
    the target holds more of its mass than the map does and lowers the rest, in proportion to the target's mass,
    unlike `cc_maps=relative`'s L1 whose gradient is the same +-1 wherever the gap passes epsilon.

    Args:
        in_context: (B, N, P) non-negative maps of each NP inside its caption.
        target: (B, N, P) distributions over patches (rows sum to 1; no gradient is taken through them).
        np_mask: (B, N) True for real NPs.

    Returns:
        A scalar; 0 (still attached to the graph) when the batch has no NP.
    """
    context = in_context.float()
    goal = target.detach().float()
    log_context = torch.log(context.clamp(min=TINY)) - torch.log(context.sum(dim=-1, keepdim=True).clamp(min=TINY))
    divergence = (goal * (torch.log(goal.clamp(min=TINY)) - log_context)).sum(dim=-1)
    return _mean_over_phrases(divergence, np_mask)


def grounding_preservation_loss(
    cosines: torch.Tensor, starting_cosines: torch.Tensor, np_mask: torch.Tensor, temperature: float
) -> torch.Tensor:
    """`loss.lambda_grounding`'s term: mean over real NPs of KL(starting towers' map || training towers' map).

    Both maps are softmaxes over patches of the towers' phrase cosines (`ClipBackbone.phrase_cosines`) at
    `temperature`; the gradient reaches the training towers only.

    Args:
        cosines: (B, N, P) the training towers' cosines (with gradient).
        starting_cosines: (B, N, P) the frozen starting towers' cosines.
        np_mask: (B, N) True for real NPs.
        temperature: softmax temperature over patches.
    """
    log_maps = torch.log_softmax(cosines.float() / temperature, dim=-1)
    log_start = torch.log_softmax(starting_cosines.detach().float() / temperature, dim=-1)
    divergence = (log_start.exp() * (log_start - log_maps)).sum(dim=-1)
    return _mean_over_phrases(divergence, np_mask)
