"""Render NP attention maps as an image grid: one row per sample, the reference image, then one heat-map overlay
per noun phrase with the phrase written underneath (Pillow only)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from shards.model_inputs import normalisation

TILE = 128
"""Pixels per side of each image tile."""
CAPTION_HEIGHT = 14
PAD = 4
# A dark-blue -> red -> yellow ramp, interpolated per channel: readable over photos without matplotlib.
_RAMP = np.array([[0, 0, 80], [40, 0, 160], [200, 30, 60], [255, 140, 0], [255, 255, 90]], dtype=np.float32)


def heat_colors(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] (any shape) to RGB uint8 along the ramp."""
    position = np.clip(values, 0.0, 1.0) * (len(_RAMP) - 1)
    low = np.floor(position).astype(int).clip(0, len(_RAMP) - 2)
    weight = (position - low)[..., None]
    return ((1 - weight) * _RAMP[low] + weight * _RAMP[low + 1]).astype(np.uint8)


def denormalise(images: torch.Tensor, backbone: str) -> np.ndarray:
    """(B,3,H,W) model inputs back to (B,TILE,TILE,3) uint8 RGB: the loaders' uint8 pixels, or normalised floats."""
    if images.dtype == torch.uint8:
        pixels = images.float() / 255
    else:
        mean, std = normalisation(backbone)
        mean_t = torch.tensor(mean).view(1, 3, 1, 1)
        std_t = torch.tensor(std).view(1, 3, 1, 1)
        pixels = (images.float() * std_t + mean_t).clamp(0, 1)
    pixels = F.interpolate(pixels, size=(TILE, TILE), mode="bilinear", align_corners=False)
    return (pixels.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


def _caption(draw: ImageDraw.ImageDraw, text: str, left: int, top: int, font) -> None:
    while text and draw.textlength(text, font=font) > TILE:
        text = text[:-2] + "…" if len(text) > 2 else ""
    draw.text((left, top), text, fill=(230, 230, 230), font=font)


def attention_grid(
    images: torch.Tensor,
    maps: torch.Tensor,
    np_mask: torch.Tensor,
    phrases: list[list[str]],
    backbone: str,
    alpha: float = 0.55,
) -> Image.Image:
    """The grid image.

    Args:
        images: (B,3,H,W) reference images, uint8 pixels or normalised floats.
        maps: (B,N,gh,gw) attention of each NP over the patch grid.
        np_mask: (B,N) True for real NPs.
        phrases: NP texts per sample, aligned with the mask.
        backbone: open_clip model name (for the normalisation to undo).
        alpha: heat-map opacity.
    """
    rows = images.shape[0]
    real = [int(np_mask[row].sum()) for row in range(rows)]
    columns = 1 + max(real + [0])
    cell_w, cell_h = TILE + PAD, TILE + CAPTION_HEIGHT + PAD
    canvas = Image.new("RGB", (columns * cell_w + PAD, rows * cell_h + PAD), (20, 20, 20))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    tiles = denormalise(images, backbone)
    upsampled = F.interpolate(maps.float(), size=(TILE, TILE), mode="bilinear", align_corners=False).numpy()
    for row in range(rows):
        top = PAD + row * cell_h
        canvas.paste(Image.fromarray(tiles[row]), (PAD, top))
        _caption(draw, "reference", PAD, top + TILE, font)
        slots = [index for index in range(np_mask.shape[1]) if bool(np_mask[row, index])]
        for column, index in enumerate(slots, start=1):
            heat = upsampled[row, index]
            span = float(heat.max() - heat.min())
            heat = (heat - heat.min()) / span if span > 0 else np.zeros_like(heat)
            overlay = (1 - alpha) * tiles[row].astype(np.float32) + alpha * heat_colors(heat).astype(np.float32)
            left = PAD + column * cell_w
            canvas.paste(Image.fromarray(overlay.round().astype(np.uint8)), (left, top))
            text = phrases[row][index] if index < len(phrases[row]) else f"NP {index}"
            _caption(draw, text, left, top + TILE, font)
    return canvas
