"""Concept maps from attention: the probabilities of a few key columns, averaged into per-NP maps, in fp32.

The fusion head (`training.model.fusion`) takes each block's NP maps from here. `MapsFromLse` computes them from a
fused kernel's row log-sum-exp, for the NP columns only, with an exact backward that recomputes instead of storing.
"""

from __future__ import annotations

import contextlib

import torch


def full_precision(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off: the maps feed an absolute-difference loss, so they stay fp32 (meta tensors have no autocast)."""
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def column_probabilities(
    query: torch.Tensor, key: torch.Tensor, lse: torch.Tensor, columns: torch.Tensor, key_valid: torch.Tensor
) -> torch.Tensor:
    """(B,H,Q,C) fp32 attention probabilities of the key `columns` (B,C): exp(q.k_c * scale - lse); 0 on PAD."""
    batch, heads, _, head_dim = key.shape
    index = columns[:, None, :, None].expand(batch, heads, columns.shape[1], head_dim)
    with full_precision(query.device):
        picked = torch.gather(key, 2, index).float()
        scores = (query.float() @ picked.transpose(-1, -2)) * head_dim**-0.5
        scores = scores.masked_fill(~torch.gather(key_valid, 1, columns)[:, None, None, :], float("-inf"))
        return torch.exp(scores - lse[..., None])


def maps_from_columns(probabilities: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(B, N, Q) fp32 per-NP maps: column probabilities (B, H, Q, C) averaged over the heads and, with `weights`
    (`ConceptColumns.weights`, (B, N, C)), over each span's tokens."""
    with full_precision(probabilities.device):  # autocast would run the einsum's bmm in bf16
        per_column = probabilities.float().mean(dim=1)  # (B, Q, C) averaged over heads
        return torch.einsum("bqc,bnc->bnq", per_column, weights.float())


class MapsFromLse(torch.autograd.Function):
    """Concept maps from the kernel's row log-sum-exp, with a backward that recomputes instead of storing.

    Forward: P_c = exp(s_c - lse) for the NP columns only, averaged into maps. The lse depends on every key, so
    the exact gradient also flows through it: with G_c = dL/dP_c, dL/ds_j = [j in C] G_j P_j - (sum_c G_c P_c) p_j
    over all keys j. The backward recomputes the patch rows' scores over all keys (B, H, P, T: the keys are a
    caption's tokens, so this is a few MB) and needs three matmuls; the forward keeps only the column
    probabilities. (An autograd-built alternative ran one more attention forward and backward per block.)
    """

    @staticmethod
    def forward(ctx, patch_query, key, patch_lse, key_valid, columns, weights):  # type: ignore[override]
        probabilities = column_probabilities(patch_query, key, patch_lse, columns, key_valid)
        maps = maps_from_columns(probabilities, weights)
        ctx.save_for_backward(patch_query, key, patch_lse, key_valid, columns, weights, probabilities)
        return maps

    @staticmethod
    def backward(ctx, grad_maps):  # type: ignore[override]
        patch_query, key, patch_lse, key_valid, columns, weights, probabilities = ctx.saved_tensors
        batch, heads, rows, head_dim = patch_query.shape
        scale = head_dim**-0.5
        with full_precision(patch_query.device):
            query, keys = patch_query.float(), key.float()
            # dL/dP_c, the same for every head (the maps average the heads).
            column_grad = torch.einsum("bnq,bnc->bqc", grad_maps.float(), weights.float())[:, None] / heads
            through_columns = column_grad * probabilities  # G_c P_c  (B, H, P, C)
            scores = (query @ keys.transpose(-1, -2)) * scale
            every_key = torch.exp(
                scores.masked_fill(~key_valid[:, None, None, :], float("-inf")) - patch_lse[..., None]
            )
            score_grad = -through_columns.sum(dim=-1, keepdim=True) * every_key  # through the lse
            index = columns[:, None, None, :].expand(batch, heads, rows, columns.shape[1])
            score_grad = score_grad.scatter_add(-1, index, through_columns)  # padding columns add 0 (weight 0)
            grad_query = (score_grad @ keys) * scale
            grad_key = (score_grad.transpose(-1, -2) @ query) * scale
        return grad_query.to(patch_query.dtype), grad_key.to(key.dtype), None, None, None, None
