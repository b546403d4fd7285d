"""What the data pipeline needs to know about an open_clip backbone: tokenizer, image size, normalisation.

Loaders hand images over as uint8 pixels (`uint8_transform`): a quarter of the bytes of float32 in DataLoader shared
memory and in the host-to-device copy. The model normalises them on its device (`normalise_images`), with the same
float32 operations as open_clip's `ToTensor` and `Normalize`, so the result is the eval transform's, bit for bit.

Also registers the project's tiny CPU model (`ContextTiny`) with open_clip, so that every package can name it
like any other open_clip model.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import open_clip
import torch
from torchvision import transforms

CONTEXT_LENGTH = 77
"""CLIP's text context; every backbone this project trains uses it."""
TINY_BACKBONE = "ContextTiny"
_MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"


@cache
def register_project_models() -> None:
    """Make `ContextTiny` (and any other JSON in shards/model_configs) known to open_clip. Idempotent."""
    open_clip.add_model_config(_MODEL_CONFIG_DIR)


def model_config(backbone: str) -> dict[str, Any]:
    """open_clip's architecture config for `backbone`; a clear error names the known models when absent."""
    register_project_models()
    config = open_clip.get_model_config(backbone)
    if config is None:
        raise ValueError(
            f"unknown open_clip backbone {backbone!r}; known models include "
            f"{', '.join(m for m in open_clip.list_models() if m.startswith(('ViT-B', 'ViT-L', 'ViT-H')))}, "
            f"{TINY_BACKBONE}"
        )
    return config


def image_size(backbone: str) -> int:
    """Square input resolution of the backbone's image tower."""
    size = model_config(backbone)["vision_cfg"]["image_size"]
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def normalisation(backbone: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) the backbone's image tower expects; CLIP's statistics unless its config says otherwise."""
    preprocess = model_config(backbone).get("preprocess_cfg", {})
    mean = tuple(preprocess.get("mean", open_clip.OPENAI_DATASET_MEAN))
    std = tuple(preprocess.get("std", open_clip.OPENAI_DATASET_STD))
    return mean, std


def eval_transform(backbone: str):
    """open_clip's inference transform for the backbone (resize, centre crop, to tensor, normalise)."""
    mean, std = normalisation(backbone)
    return open_clip.image_transform(image_size(backbone), is_train=False, mean=mean, std=std)


def uint8_transform(backbone: str) -> transforms.Compose:
    """The eval transform up to its pixels: the same resize and centre crop, then (3, S, S) uint8, not normalised.

    Built from `eval_transform` itself, with its to-tensor step swapped for `PILToTensor` and its `Normalize`
    dropped, so the crop cannot drift from open_clip's. `normalise_images` finishes the job on the device.
    """
    steps, swapped, dropped = [], 0, 0
    for step in eval_transform(backbone).transforms:
        if isinstance(step, transforms.Normalize):
            dropped += 1
        elif isinstance(step, transforms.ToTensor):  # open_clip's MaybeToTensor is one
            steps.append(transforms.PILToTensor())
            swapped += 1
        else:
            steps.append(step)
    if (swapped, dropped) != (1, 1):
        raise RuntimeError(f"open_clip's eval transform changed shape; cannot derive the uint8 one from {steps}")
    return transforms.Compose(steps)


def normalise_images(
    images: torch.Tensor, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor
) -> torch.Tensor:
    """float32 model inputs from uint8 pixels (..., 3, H, W), on the pixels' device: `/ 255`, `- mean`, `/ std`.

    These are `ToTensor`'s and `Normalize`'s float32 operations in their order, so the result equals
    `eval_transform(backbone)(image)` exactly for the pixels of `uint8_transform(backbone)(image)`.

    Args:
        images: uint8 pixels.
        mean, std: per-channel statistics (`normalisation(backbone)`), or float32 tensors of 3 already on the
            images' device (the model keeps them as buffers: no host-to-device copy per call).
    """
    if images.dtype != torch.uint8:
        raise TypeError(f"normalise_images takes uint8 pixels, got {images.dtype}")
    device = images.device
    mean = torch.as_tensor(mean, dtype=torch.float32, device=device).reshape(-1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32, device=device).reshape(-1, 1, 1)
    # A division by a device tensor, not by the number 255: CUDA turns a division by a host scalar into a
    # multiplication by its reciprocal, which can differ from ToTensor's `/ 255` in the last bit.
    scale = torch.full((), 255.0, dtype=torch.float32, device=device)
    return images.to(torch.float32).div_(scale).sub_(mean).div_(std)


@lru_cache(maxsize=8)
def tokenizer(backbone: str):
    """The backbone's open_clip tokenizer at CLIP's 77-token context."""
    register_project_models()
    return open_clip.get_tokenizer(backbone, context_length=CONTEXT_LENGTH)


def tokenizer_name(backbone: str) -> str:
    """Stable name of the tokenizer a shard set was built with; shard sets and models must agree on it."""
    tok = tokenizer(backbone)
    if isinstance(tok, open_clip.SimpleTokenizer):
        return f"clip-bpe-{len(tok.encoder)}"
    return f"{type(tok).__name__}:{getattr(tok, 'tokenizer_name', backbone)}"


def box_in_crop(box: Sequence[float], width: int, height: int) -> tuple[float, float, float, float]:
    """Map a box in fractions of the original image to fractions of the centre square the eval transform keeps.

    open_clip's eval transform resizes the shortest side and centre-crops a square, so on a non-square image the
    patch grid covers only the middle of the long side.
    """
    side = min(width, height)
    offset_x, offset_y = (width - side) / 2, (height - side) / 2
    x0, y0, x1, y1 = box
    mapped = ((x0 * width - offset_x) / side, (y0 * height - offset_y) / side)
    mapped += ((x1 * width - offset_x) / side, (y1 * height - offset_y) / side)
    return tuple(min(max(float(value), 0.0), 1.0) for value in mapped)  # type: ignore[return-value]
