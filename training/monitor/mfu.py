"""Model FLOPs utilisation: analytic FLOPs of a training step and the devices' datasheet peaks."""

from __future__ import annotations

from typing import Any

# Dense bf16 peak per device, in FLOP/s, for MFU when `logging.peak_tflops` is not set (vendor datasheets).
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12}


def peak_bf16_flops(device_name: str) -> float | None:
    """The datasheet bf16 peak of a device by its name (`torch.cuda.get_device_name`), or None when unknown."""
    return next((peak for key, peak in PEAK_BF16.items() if key in device_name), None)


def _transformer_flops(tokens: int, width: int, layers: int, mlp_width: int) -> int:
    """Forward matmul FLOPs (2 per multiply-add) of a pre-norm transformer over one sequence."""
    return layers * (2 * tokens * (4 * width * width + 2 * width * mlp_width) + 4 * tokens * tokens * width)


def analytic_step_flops(objective: Any, batch_size: int, text_tokens: int, nps: int, np_tokens: int) -> float:
    """Matmul FLOPs of one efficient step: 3x forward for the main pass (forward + backward), 1x for the NP pass.

    Args:
        objective: the objective whose model's dimensions are counted.
        batch_size: triplets in the step.
        text_tokens: caption keys after trimming; np_tokens: NP keys after trimming; nps: NPs per caption.
    """
    model = objective.model
    visual, clip = model.backbone.clip.visual, model.backbone.clip
    text = getattr(clip, "text", clip)
    patches = model.patch_grid[0] * model.patch_grid[1]
    queries = patches + model.backbone.image_prefix_tokens
    width, text_width, dim = model.backbone.image_width, model.backbone.text_width, model.backbone.embed_dim
    vision = visual.transformer
    image = 2 * patches * visual.conv1.weight[0].numel() * width + 2 * width * dim
    image += _transformer_flops(queries, width, len(vision.resblocks), vision.resblocks[0].mlp.c_fc.out_features)

    def text_flops(tokens: int) -> int:
        tower = text.transformer
        return _transformer_flops(tokens, text_width, len(tower.resblocks), tower.resblocks[0].mlp.c_fc.out_features)

    blocks = model.fusion.blocks
    ffn_width = blocks[0].ffn[0].out_features

    def fusion_flops(rows: int, keys: int, full_last: bool) -> int:
        per_block = 2 * rows * (2 * width * width + 2 * width * ffn_width) + 4 * keys * text_width * width
        per_block += 4 * rows * keys * width
        last = per_block if full_last else 2 * rows * width * width + 2 * keys * text_width * width
        return (len(blocks) - 1) * per_block + last + 4 * patches * keys * width * len(blocks)  # + lse gradient

    pooler = 2 * queries * 2 * width * width + 2 * width * dim
    main = batch_size * (2 * image + text_flops(text_tokens) + fusion_flops(queries, text_tokens, True) + pooler)
    isolated = batch_size * nps * (text_flops(np_tokens) + fusion_flops(patches, np_tokens, False))
    return float(3 * main + isolated)
