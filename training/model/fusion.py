"""The fusion head: image tokens query the caption through L pre-norm cross-attention + FFN blocks.

Attention runs on fused kernels (`scaled_dot_product_attention`). The Text-CC loss needs attention probabilities
only for the key columns of noun-phrase tokens, so no block ever materialises the full probability matrix in
training: the fused kernel also returns each query row's log-sum-exp, and the probabilities of the few NP columns
are recomputed as exp(q.k * scale - lse) (`training.model.concept_maps`). The kernel's lse carries no gradient;
the maps' own backward (`MapsFromLse`) adds the exact one (d lse / d s_j = p_j). The eager path (`eager=True`)
computes the full softmax and stays as the reference for tests and benchmarks.

PAD keys (id 0 after the last non-zero id, i.e. after EOT) are masked in every path, so a text's own length is all
that matters: running the text tower on ids cut after the batch's longest text gives the same result, and the
keys are then padded (masked) to a multiple of 16, the lengths the fused kernels handle best.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from training.model.concept_maps import MapsFromLse, maps_from_columns

logger = logging.getLogger(__name__)
KEY_LENGTH_MULTIPLE = 16
"""Fusion keys are padded (masked) to a multiple of this: PyTorch's CPU flash kernel runs several times faster on
such lengths (16 keys: 3x faster than 8 on the project's CPU), and the kernels see at most 5 key lengths."""


def key_padding_mask(ids: torch.Tensor) -> torch.Tensor:
    """(B, T) True for real tokens: every position up to the last non-zero id (EOT); PAD (0) after it is False."""
    nonzero = ids != 0
    positions = torch.arange(ids.shape[1], device=ids.device)
    last = torch.where(nonzero, positions, -1).amax(dim=1, keepdim=True)
    return positions <= last


def text_length(ids: torch.Tensor) -> int:
    """Tokens up to the batch's longest text (its EOT), at least 1. Read from the values: on a GPU this is a host
    sync, so the training forward takes it from `training.model.batch_layout.BatchLayout`, read on the host."""
    return max(1, int(key_padding_mask(ids).sum(dim=1).max().item())) if ids.numel() else 1


def trim_padding(ids: torch.Tensor, length: int | None = None) -> torch.Tensor:
    """`ids` cut after the batch's longest text (`length` when the caller read it already); exact for a causal
    tower with masked PAD."""
    if ids.device.type == "meta":
        return ids  # no values to read (shape checks on the meta device)
    return ids[:, : text_length(ids) if length is None else length]


@dataclass
class TextKeys:
    """The caption side of cross-attention: the text tower's token states and which of them are real keys."""

    states: torch.Tensor
    """(B, T, text_width) token states."""
    valid: torch.Tensor
    """(B, T) True for real tokens; PAD keys are masked in every attention path."""

    @classmethod
    def of(cls, states: torch.Tensor, ids: torch.Tensor) -> TextKeys:
        """The keys of texts `ids` (B, T) whose states the text tower returned."""
        return cls(states, key_padding_mask(ids))

    def padded(self) -> TextKeys:
        """Padded with masked keys up to a multiple of `KEY_LENGTH_MULTIPLE`."""
        extra = (-self.states.shape[1]) % KEY_LENGTH_MULTIPLE
        if not extra:
            return self
        return TextKeys(F.pad(self.states, (0, 0, 0, extra)), F.pad(self.valid, (0, extra), value=False))

    def __getitem__(self, rows) -> TextKeys:
        return TextKeys(self.states[rows], self.valid[rows])

    def expand(self, batch: int) -> TextKeys:
        """One text's keys repeated for `batch` queries (a view, no copy)."""
        return TextKeys(self.states.expand(batch, -1, -1), self.valid.expand(batch, -1))


@dataclass
class ConceptColumns:
    """Which attention entries form the concept maps: key columns, their averaging weights, and the query rows.

    Only the union of NP token positions of each text is kept (`columns`), so the probabilities computed are
    (B, H, patches, C) with C the most NP tokens any text of the batch has, never the full key length.
    """

    columns: torch.Tensor
    """(B, C) key positions; padding entries point at position 0 with zero weight."""
    weights: torch.Tensor
    """(B, N, C) float: 1/len(span) on the columns of NP n's span, 0 elsewhere (and for masked NPs)."""
    query_prefix: int = 0
    """Query rows before the patch grid (the CLS token), left out of the maps."""

    @classmethod
    def from_spans(
        cls,
        np_spans: torch.Tensor,
        np_mask: torch.Tensor,
        key_length: int,
        query_prefix: int = 0,
        width: int | None = None,
    ) -> ConceptColumns:
        """Columns of `np_spans` (B, N, 2) `[start, end)` in texts of `key_length` keys; `np_mask` (B, N).

        `width` is the most NP tokens any text has, when the caller read it already on the host; without it, it is
        read from the values (a host sync on a GPU).
        """
        batch, count = np_mask.shape
        device = np_spans.device
        starts = np_spans[..., 0].clamp(0, key_length)
        ends = torch.maximum(np_spans[..., 1].clamp(0, key_length), starts)
        valid = np_mask.bool() & (ends > starts)
        positions = torch.arange(key_length, device=device)
        inside = (positions >= starts[..., None]) & (positions < ends[..., None]) & valid[..., None]  # (B,N,T)
        covered = inside.any(dim=1)  # (B,T)
        if width is None and device.type == "meta":
            width = key_length  # no values to read (shape checks on the meta device)
        elif width is None:
            width = max(1, int(covered.sum(dim=1).max().item())) if batch and count else 1
        # A stable sort puts each text's covered positions first, in increasing order.
        order = torch.sort((~covered).to(torch.int8), dim=1, stable=True).indices[:, :width]
        real = torch.arange(width, device=device) < covered.sum(dim=1, keepdim=True)
        columns = torch.where(real, order, 0)
        selected = torch.gather(inside, 2, columns[:, None, :].expand(batch, count, width)) & real[:, None, :]
        lengths = (ends - starts).clamp(min=1).to(torch.float32)
        weights = selected.to(torch.float32) / lengths[..., None]
        return cls(columns=columns, weights=weights, query_prefix=query_prefix)

    def __getitem__(self, rows) -> ConceptColumns:
        return ConceptColumns(self.columns[rows], self.weights[rows], self.query_prefix)

    @classmethod
    def isolated(cls, np_ids: torch.Tensor, query_prefix: int = 0, width: int | None = None) -> ConceptColumns:
        """Columns of NPs encoded alone, one per row of `np_ids` (M, L): every token between SOT and EOT."""
        eot = key_padding_mask(np_ids).sum(dim=1) - 1  # last real position
        spans = torch.stack([torch.ones_like(eot), eot.clamp(min=1)], dim=1)[:, None, :]
        mask = torch.ones(np_ids.shape[0], 1, dtype=torch.bool, device=np_ids.device)
        return cls.from_spans(spans, mask, np_ids.shape[1], query_prefix, width)


def split_heads(projected: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, L, W) -> (B, heads, L, W / heads)."""
    batch, length, width = projected.shape
    return projected.view(batch, length, heads, width // heads).transpose(1, 2)


def merge_heads(per_head: torch.Tensor) -> torch.Tensor:
    """(B, heads, L, d) -> (B, L, heads * d)."""
    batch, heads, length, head_dim = per_head.shape
    return per_head.transpose(1, 2).reshape(batch, length, heads * head_dim)


def _additive_mask(key_valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, 1, T) 0 for real keys and -inf for PAD, in the query's dtype (the fused kernels require it)."""
    mask = torch.zeros(key_valid.shape, dtype=dtype, device=key_valid.device)
    return mask.masked_fill(~key_valid, float("-inf"))[:, None, None, :]


def attention_eager(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference attention: (output, probabilities (B,H,Q,T) in fp32); PAD keys get exactly zero probability."""
    scores = (query @ key.transpose(-1, -2)).float() * query.shape[-1] ** -0.5
    probabilities = scores.masked_fill(~key_valid[:, None, None, :], float("-inf")).softmax(dim=-1)
    return probabilities.to(value.dtype) @ value, probabilities


_warned_lse_fallback = False
_UNAVAILABLE = ("not supported", "no available kernel", "not implemented", "no kernel image")
"""Words of the errors a kernel raises when the device, dtype or shape has no implementation."""


def _kernel_with_lse(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused kernel that also returns the row log-sum-exp: CPU flash, or CUDA memory-efficient."""
    if query.device.type != "cuda":  # CPU (and meta, for shape checks)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, attn_mask=mask, scale=scale
        )
    # The memory-efficient kernel wants its bias padded to 16 keys; expand it like SDPA's own front end does.
    batch, heads, queries, keys = *query.shape[:3], key.shape[2]
    padded = F.pad(mask, (0, (-keys) % 16))[..., :keys].expand(batch, heads, queries, keys)
    efficient = torch.ops.aten._scaled_dot_product_efficient_attention
    output, lse = efficient(query, key, value, padded, True, scale=scale)[:2]
    return output, lse[..., :queries]


def _kernel_unavailable(error: Exception) -> bool:
    """True for a kernel's "not supported here" error; never for running out of memory or a real failure."""
    if isinstance(error, torch.OutOfMemoryError):
        return False
    return isinstance(error, NotImplementedError) or any(words in str(error).lower() for words in _UNAVAILABLE)


def attention_fused_with_lse(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused attention that also returns each row's log-sum-exp (B,H,Q) in fp32 (no gradient through lse).

    Where the device has no such kernel, the output comes from plain SDPA and the lse from the scores, computed
    without gradient like the kernel's, so the maps' backward adds its gradient exactly once.
    """
    global _warned_lse_fallback
    scale = query.shape[-1] ** -0.5
    try:
        output, lse = _kernel_with_lse(query, key, value, _additive_mask(key_valid, query.dtype), scale)
        return output, lse.float()
    except (RuntimeError, NotImplementedError) as error:
        if not _kernel_unavailable(error):
            raise
        if not _warned_lse_fallback:
            logger.warning("fused attention with log-sum-exp unavailable (%s); computing lse explicitly", error)
            _warned_lse_fallback = True
    output = F.scaled_dot_product_attention(query, key, value, attn_mask=key_valid[:, None, None, :])
    with torch.no_grad():
        scores = (query @ key.transpose(-1, -2)).float() * scale
        lse = scores.masked_fill(~key_valid[:, None, None, :], float("-inf")).logsumexp(dim=-1)
    return output, lse


def maps_from_probabilities(probabilities: torch.Tensor, concepts: ConceptColumns) -> torch.Tensor:
    """(B, N, Q - prefix) per-NP maps from full eager probabilities (B, H, Q, T): the reference path."""
    index = concepts.columns[:, None, None, :].expand(*probabilities.shape[:3], -1)
    return maps_from_columns(torch.gather(probabilities, 3, index)[:, :, concepts.query_prefix :], concepts.weights)


def maps_from_lse(
    patch_query: torch.Tensor, key: torch.Tensor, patch_lse: torch.Tensor, keys: TextKeys, concepts: ConceptColumns
) -> torch.Tensor:
    """(B, N, P) fp32 per-NP maps from a fused kernel's row log-sum-exp: only the NP columns are computed.

    Args:
        patch_query: (B, H, P, d) the patch rows of the queries (prefix rows already left out).
        key: (B, H, T, d) keys.
        patch_lse: (B, H, P) the kernel's log-sum-exp of those rows (it carries no gradient; the maps' backward
            adds the exact one).
    """
    return MapsFromLse.apply(patch_query, key, patch_lse.detach(), keys.valid, concepts.columns, concepts.weights)


class CrossAttentionBlock(nn.Module):
    """Pre-norm residual block: image tokens attend to text tokens, then an FFN. The identity at init.

    `text_norm` (`model.text_kv_layernorm`) adds a LayerNorm on the text states before the key/value projections;
    without it the states enter them as they are (an `Identity`, so the weights hold no such LayerNorm).
    """

    def __init__(self, width: int, text_width: int, heads: int, ffn_mult: int, text_norm: bool = False) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"model.fusion_heads={heads} must divide the image width {width}")
        self.heads = heads
        self.query_norm = nn.LayerNorm(width)
        self.text_norm = nn.LayerNorm(text_width) if text_norm else nn.Identity()
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(text_width, width)
        self.v_proj = nn.Linear(text_width, width)
        self.out_proj = nn.Linear(width, width)
        self.ffn_norm = nn.LayerNorm(width)
        self.ffn = nn.Sequential(nn.Linear(width, ffn_mult * width), nn.GELU(), nn.Linear(ffn_mult * width, width))
        # Zero output layers: both residual branches start at 0, so the head starts as the identity on CLIP tokens.
        for layer in (self.out_proj, self.ffn[2]):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def _queries_and_keys(self, tokens: torch.Tensor, text_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        query = split_heads(self.q_proj(self.query_norm(tokens)), self.heads)
        return query, split_heads(self.k_proj(text_norm), self.heads)

    def forward(
        self, tokens: torch.Tensor, keys: TextKeys, concepts: ConceptColumns | None = None, eager: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Tokens (B,Q,W) after the block, and with `concepts` the block's NP maps (B,N,Q-prefix) over patch rows."""
        text_norm = self.text_norm(keys.states)
        query, key = self._queries_and_keys(tokens, text_norm)
        value = split_heads(self.v_proj(text_norm), self.heads)
        maps = None
        if eager:
            attended, probabilities = attention_eager(query, key, value, keys.valid)
            if concepts is not None:
                maps = maps_from_probabilities(probabilities, concepts)
        elif concepts is not None:
            attended, lse = attention_fused_with_lse(query, key, value, keys.valid)
            prefix = concepts.query_prefix
            maps = maps_from_lse(query[:, :, prefix:], key, lse[:, :, prefix:], keys, concepts)
        else:
            attended = F.scaled_dot_product_attention(query, key, value, attn_mask=keys.valid[:, None, None, :])
        tokens = tokens + self.out_proj(merge_heads(attended))
        tokens = tokens + self.ffn(self.ffn_norm(tokens))
        return tokens, maps

    def concept_maps(
        self, tokens: torch.Tensor, keys: TextKeys, concepts: ConceptColumns, eager: bool = False
    ) -> torch.Tensor:
        """The block's NP maps alone: no value projection, no output projection, no FFN."""
        query, key = self._queries_and_keys(tokens, self.text_norm(keys.states))
        if eager:
            return maps_from_probabilities(attention_eager(query, key, key, keys.valid)[1], concepts)
        # Only the patch rows are mapped, so only they go through the kernel. It needs some value; the keys serve,
        # and the (unused) output costs one small matmul.
        patch_query = query[:, :, concepts.query_prefix :]
        _, patch_lse = attention_fused_with_lse(patch_query, key, key, keys.valid)
        return maps_from_lse(patch_query, key, patch_lse, keys, concepts)


class FusionHead(nn.Module):
    """L cross-attention blocks; concept maps are averaged over the blocks."""

    def __init__(
        self, width: int, text_width: int, layers: int, heads: int, ffn_mult: int, text_norm: bool = False
    ) -> None:
        super().__init__()
        blocks = (CrossAttentionBlock(width, text_width, heads, ffn_mult, text_norm) for _ in range(layers))
        self.blocks = nn.ModuleList(blocks)

    def forward(
        self, tokens: torch.Tensor, keys: TextKeys, concepts: ConceptColumns | None = None, eager: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Fused tokens (B,Q,W) and, with `concepts`, NP maps (B,N,Q-prefix) averaged over blocks and heads."""
        keys = keys.padded()
        total = None
        for block in self.blocks:
            tokens, maps = block(tokens, keys, concepts, eager)
            if maps is not None:
                total = maps if total is None else total + maps
        return tokens, None if total is None else total / len(self.blocks)

    def concept_maps(
        self, tokens: torch.Tensor, keys: TextKeys, concepts: ConceptColumns, eager: bool = False
    ) -> torch.Tensor:
        """NP maps only: the last block skips its value path and FFN (nothing downstream reads its tokens)."""
        keys = keys.padded()
        total = None
        for block in self.blocks[:-1]:
            tokens, maps = block(tokens, keys, concepts, eager)
            total = maps if total is None else total + maps
        last = self.blocks[-1].concept_maps(tokens, keys, concepts, eager)
        total = last if total is None else total + last
        return total / len(self.blocks)
