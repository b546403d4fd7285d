"""The Text Concept-Consistency loss: each noun phrase's in-context attention map against its isolated map."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
