"""Drawing scenes with Pillow: flat shapes on a plain canvas, deterministic PNG bytes, object boxes."""

from __future__ import annotations

import io

from PIL import Image, ImageDraw

from shards.synthetic.scenes import GRID, Scene, SceneObject

PALETTE = {
    "red": (220, 30, 30),
    "green": (20, 160, 40),
    "blue": (30, 70, 230),
    "yellow": (240, 200, 0),
    "purple": (140, 40, 190),
    "orange": (250, 120, 0),
    "cyan": (0, 190, 210),
}
"""Well separated, saturated colours for objects."""
BACKGROUNDS = {
    "white": (245, 245, 245),
    "cream": (250, 236, 212),
    "sky": (214, 232, 250),
    "mint": (216, 244, 222),
    "lavender": (232, 222, 248),
    "pink": (250, 220, 232),
    "gray": (200, 200, 200),
    "sand": (232, 226, 196),
}
"""Pale canvas tints: every object colour stands out on each of them."""
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
EXTENT = {"small": 0.5, "large": 0.84}
"""Object extent (width and height) as a fraction of a grid cell; large objects still leave a gap between cells."""
SUPERSAMPLE = 4
"""Drawn at this multiple of the canvas size and reduced, which smooths the edges without antialiasing support."""


def object_box(obj: SceneObject) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) of the object's bounding box as fractions of the canvas width and height."""
    cell = 1.0 / GRID
    row, column = obj.cell
    centre_x = (column + 0.5 + obj.offset[0]) * cell
    centre_y = (row + 0.5 + obj.offset[1]) * cell
    half = EXTENT[obj.size] * cell / 2
    return (centre_x - half, centre_y - half, centre_x + half, centre_y + half)


def _outline(shape: str, box: tuple[float, float, float, float]) -> list[tuple[float, float]]:
    x0, y0, x1, y1 = box
    mid_x, mid_y = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "triangle":
        return [(mid_x, y0), (x1, y1), (x0, y1)]
    if shape == "diamond":
        return [(mid_x, y0), (x1, mid_y), (mid_x, y1), (x0, mid_y)]
    if shape == "cross":
        arm = (x1 - x0) / 6
        return [
            (mid_x - arm, y0), (mid_x + arm, y0), (mid_x + arm, mid_y - arm), (x1, mid_y - arm),
            (x1, mid_y + arm), (mid_x + arm, mid_y + arm), (mid_x + arm, y1), (mid_x - arm, y1),
            (mid_x - arm, mid_y + arm), (x0, mid_y + arm), (x0, mid_y - arm), (mid_x - arm, mid_y - arm),
        ]  # fmt: skip
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def render(scene: Scene, canvas: int) -> Image.Image:
    """The scene as an RGB image of `canvas` x `canvas` pixels."""
    big = canvas * SUPERSAMPLE
    if scene.background not in BACKGROUNDS:
        raise ValueError(f"unknown background {scene.background!r}; known: {sorted(BACKGROUNDS)}")
    image = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        if obj.color not in PALETTE:
            raise ValueError(f"unknown colour {obj.color!r}; known: {sorted(PALETTE)}")
        box = tuple(round(v * big) for v in object_box(obj))
        fill = PALETTE[obj.color]
        if obj.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif obj.shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon(_outline(obj.shape, box), fill=fill)
    return image.resize((canvas, canvas), Image.Resampling.BOX)


def png_bytes(image: Image.Image) -> bytes:
    """PNG with no metadata chunks (no time, no text), so equal pixels give equal bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()
