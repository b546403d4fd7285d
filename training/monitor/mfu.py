"""Model FLOPs utilisation: an analytic count of one training step's model FLOPs, and the devices' peaks.

The count is of the work the algorithm needs, never of how it is run: activation-checkpoint recomputation is not
counted, so MFU does not rise when checkpointing is switched on. It covers both towers (forward and backward), the
fusion head with the Text-CC maps, the pooler and projection, the contrastive logits, and the isolated noun-phrase
pass (forward only, no gradient). Fusion keys are counted at their padded length, as the kernels run them.
`perf/mfu` (the monitor) and `launch/bench.py` both use `step_flops`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from training.model.fusion import KEY_LENGTH_MULTIPLE

# Dense (no sparsity) bf16 tensor-core peaks in FLOP/s from the vendor datasheets, matched against
# `torch.cuda.get_device_name` in this order: a more specific name comes before the name it contains.
PEAK_BF16: tuple[tuple[str, float | None], ...] = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H200 NVL", 835e12),
    ("GH200", 989e12),
    ("H200", 989e12),
    ("H100", 989e12),  # SXM (e.g. "NVIDIA H100 80GB HBM3")
    ("B200", 2250e12),
    ("A100", 312e12),  # SXM and PCIe alike
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10G", None),  # not the A10's figure: unknown here, set logging.peak_tflops
    ("A10", 125e12),
)


def peak_bf16_flops(device_name: str, override_tflops: float | None = None) -> float | None:
    """The bf16 peak of a device by its name, `override_tflops` (TFLOP/s) when given; None when unknown."""
    if override_tflops:
        return override_tflops * 1e12
    return next((peak for key, peak in PEAK_BF16 if key in device_name), None)


@dataclass(frozen=True)
class StepShape:
    """What one micro-batch's FLOPs depend on besides the model."""

    batch_size: int
    """Triplets in the micro-batch."""
    text_tokens: int
    """Caption length after trimming to the longest caption (start and end tokens included)."""
    noun_phrases: int = 0
    """Real noun phrases in the micro-batch (the isolated pass encodes each once)."""
    np_tokens: int = 0
    """Isolated noun-phrase length after trimming."""

    @classmethod
    def of(cls, batch: dict[str, Any]) -> StepShape:
        """The shape of a reader batch. Reads its (host) tensors only: no device sync."""
        caption_ids = batch["caption_ids"]
        noun_phrases = int(batch["np_mask"].sum()) if "np_mask" in batch else 0
        np_tokens = int((batch["np_ids"] != 0).sum(dim=-1).max()) if noun_phrases else 0
        return cls(caption_ids.shape[0], int((caption_ids != 0).sum(dim=1).max()), noun_phrases, np_tokens)


def _padded(keys: int) -> int:
    return -(-keys // KEY_LENGTH_MULTIPLE) * KEY_LENGTH_MULTIPLE


def _transformer(tokens: int, width: int, layers: int, mlp_width: int) -> int:
    """Forward FLOPs (2 per multiply-add) of a transformer over one sequence: projections, MLP, attention."""
    return layers * (2 * tokens * (4 * width * width + 2 * width * mlp_width) + 4 * tokens * tokens * width)


def _tower(tower: Any, tokens: int) -> int:
    blocks = tower.resblocks
    return _transformer(tokens, tower.width, len(blocks), blocks[0].mlp.c_fc.out_features)


def step_flops(model: torch.nn.Module, shape: StepShape, text_cc: bool = True) -> float:
    """Model FLOPs of one forward + backward of a ConText-CIR micro-batch (backward = 2x forward).

    Args:
        model: the `ConTextCIR` network (only its dimensions are read).
        shape: the micro-batch (`StepShape.of(batch)`).
        text_cc: whether the step computes the Text-CC maps and the isolated pass (`loss.lambda_cc > 0`).
    """
    backbone = model.backbone
    visual = backbone.clip.visual
    text = getattr(backbone.clip, "text", backbone.clip)
    width, text_width, dim = backbone.image_width, backbone.text_width, backbone.embed_dim
    patches = model.patch_grid[0] * model.patch_grid[1]
    queries = patches + backbone.image_prefix_tokens
    blocks = model.fusion.blocks
    ffn = blocks[0].ffn[0].out_features

    conv = 2 * patches * visual.conv1.weight[0].numel() * width  # its backward needs no input gradient: 2x, not 3x
    image = _tower(visual.transformer, queries) + (2 * width * dim if visual.proj is not None else 0)

    def cross_block(rows: int, keys: int, full: bool = True) -> int:
        """One fusion block's forward: q (and out, FFN when `full`) over `rows`, k and v over `keys`, attention."""
        own = 2 * rows * (2 * width * width + 2 * width * ffn) if full else 2 * rows * width * width
        return own + (4 if full else 2) * keys * text_width * width + 4 * rows * keys * width

    keys = _padded(shape.text_tokens)
    fusion = len(blocks) * cross_block(queries, keys)
    if text_cc:
        fusion += len(blocks) * 4 * patches * keys * width  # the lse gradient's attention over the patch rows
    pooler = 4 * queries * width * width + 2 * width * dim
    main = 2 * image + _tower(text.transformer, shape.text_tokens) + fusion + pooler
    contrastive = 2 * 3 * shape.batch_size * dim  # per query: target, reference and symmetric logits (local share)
    total = shape.batch_size * (3 * main + 2 * 2 * conv) + 3 * shape.batch_size * contrastive
    if text_cc and shape.noun_phrases:
        np_keys = _padded(shape.np_tokens)
        per_phrase = _tower(text.transformer, shape.np_tokens)
        per_phrase += (len(blocks) - 1) * cross_block(patches, np_keys) + cross_block(patches, np_keys, full=False)
        total += shape.noun_phrases * per_phrase  # no gradient: forward only
    return float(total)
