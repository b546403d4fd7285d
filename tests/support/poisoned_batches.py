"""Reader batches with a NaN pixel, the fault the non-finite tests put into one rank."""

from __future__ import annotations

from typing import Any

from shards.model_inputs import normalisation, normalise_images

IMAGES = ("reference_image", "target_image")


def with_nan_pixels(batch: dict[str, Any], backbone: str, where: tuple = (0,)) -> dict[str, Any]:
    """A copy of `batch` whose images are normalised floats, with NaN at `reference_image[where]`.

    The reader hands over uint8 pixels, which cannot hold a NaN; the model takes float images as already
    normalised, so the poisoned batch is the same batch to it but for the NaN.
    """
    poisoned = dict(batch)
    for name in IMAGES:
        poisoned[name] = normalise_images(batch[name], *normalisation(backbone))
    poisoned["reference_image"][where] = float("nan")
    return poisoned
