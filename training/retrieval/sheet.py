"""Contact sheets: one PNG showing a composed-image-retrieval query and its top-k results.

The sheet has a header (the query image's thumbnail beside the query text, wrapped, and where the target stands)
and below it a grid of result tiles, ``columns`` to a row. Each tile is the gallery image fitted into a square
``thumb`` pixels wide, framed, and labelled with its rank, score and (ellipsised) id. The target's tile, when it
was retrieved, has a thick green frame and a "target" tab; every other tile a thin grey one. A result whose file
cannot be read is drawn as a grey "unreadable" placeholder, so one bad gallery file never loses the whole sheet.

Only PIL is used. Text is set in DejaVu Sans when it is installed, else in PIL's built-in font.
"""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, ImageOps

from training.retrieval.hit import Hit

_DEJAVU = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont
Colour = tuple[int, int, int]

BACKGROUND: Colour = (255, 255, 255)
INK: Colour = (30, 30, 30)
MUTED: Colour = (110, 110, 110)
FRAME: Colour = (175, 175, 175)
TARGET: Colour = (0, 200, 0)
MISSING: Colour = (200, 30, 30)
PLACEHOLDER: Colour = (215, 215, 215)

MARGIN = 16
GAP = 12
LABEL_LINES = 2
MAX_HEADER_LINES = 6
MIN_HEADER_TEXT_WIDTH = 260


@dataclass(frozen=True)
class _Layout:
    """Sizes derived from ``thumb`` and ``columns``; every tile is ``tile`` pixels square including its frame."""

    thumb: int
    columns: int
    border: int
    font: Font
    header_font: Font
    line: int
    header_line: int

    @property
    def tile(self) -> int:
        return self.thumb + 2 * self.border

    @property
    def cell_height(self) -> int:
        return self.tile + LABEL_LINES * self.line

    @property
    def width(self) -> int:
        grid = self.columns * self.tile + (self.columns - 1) * GAP
        header = self.tile + GAP + MIN_HEADER_TEXT_WIDTH
        return 2 * MARGIN + max(grid, header)

    @property
    def header_text_width(self) -> int:
        return self.width - 2 * MARGIN - self.tile - GAP


def contact_sheet(
    query_image: str | Path | Image.Image,
    query_text: str,
    hits: Sequence[Hit],
    out: str | Path,
    target: str | None = None,
    thumb: int = 160,
    columns: int = 5,
) -> Path:
    """Draw one query and its ranked results as a PNG contact sheet.

    Args:
        query_image: The reference image, as a file path or an already opened PIL image.
        query_text: The modification text of the composed query.
        hits: The ranked results, best first; may be empty (the sheet then says "no results").
        out: Where to write the PNG. Its parent directory is created; the file is replaced atomically.
        target: The id of the correct gallery image, if known. Its tile is framed in green; when it is not among
            ``hits`` the header says so.
        thumb: Side of the square each thumbnail is fitted into, in pixels (aspect ratio is kept).
        columns: Result tiles per row.

    Returns:
        The path written, ``out`` as a ``Path``.

    Raises:
        FileNotFoundError: ``query_image`` is a path that does not exist.
        ValueError: ``thumb`` or ``columns`` is too small to draw.
    """
    if thumb < 32:
        raise ValueError(f"thumb must be at least 32 pixels, got {thumb}")
    if columns < 1:
        raise ValueError(f"columns must be at least 1, got {columns}")
    query, query_name = _open_query(query_image)
    layout = _layout(thumb, columns)

    header_lines = _header_lines(query_name, query_text, hits, target, layout)
    header_height = max(layout.tile, len(header_lines) * layout.header_line)
    rows = -(-len(hits) // columns)
    rule = MARGIN + header_height + GAP
    grid_top = rule + 1 + GAP
    height = grid_top + rows * layout.cell_height + (rows - 1) * GAP + MARGIN if rows else rule - GAP + MARGIN

    sheet = Image.new("RGB", (layout.width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    _paste_tile(sheet, draw, query, (MARGIN, MARGIN), layout, highlight=False)
    _draw_header_text(draw, header_lines, (MARGIN + layout.tile + GAP, MARGIN), layout)
    if rows:
        draw.line([(MARGIN, rule), (layout.width - MARGIN, rule)], fill=FRAME)

    for i, hit in enumerate(hits):
        row, col = divmod(i, columns)
        xy = (MARGIN + col * (layout.tile + GAP), grid_top + row * (layout.cell_height + GAP))
        _draw_hit(sheet, draw, hit, xy, layout, is_target=target is not None and hit.id == target)

    return _save_atomically(sheet, Path(out))


def _layout(thumb: int, columns: int) -> _Layout:
    size = max(11, min(16, thumb // 12))
    font, header_font = _font(size), _font(size + 2)
    return _Layout(
        thumb=thumb,
        columns=columns,
        border=max(4, thumb // 32),
        font=font,
        header_font=header_font,
        line=_line_height(font),
        header_line=_line_height(header_font),
    )


@functools.lru_cache(maxsize=8)
def _font(size: int) -> Font:
    """DejaVu Sans at ``size`` pixels, else PIL's built-in font (scalable from Pillow 10.1, fixed before)."""
    for name in ("DejaVuSans.ttf", _DEJAVU):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def _line_height(font: Font) -> int:
    _, top, _, bottom = font.getbbox("Ag|")
    return int(bottom - top) + 5


def _open_query(query_image: str | Path | Image.Image) -> tuple[Image.Image, str]:
    """The query as an RGB image, and a name to show for it."""
    if isinstance(query_image, Image.Image):
        return _to_rgb(query_image), "image"
    path = Path(query_image)
    if not path.is_file():
        raise FileNotFoundError(f"query image not found: {path}")
    with Image.open(path) as image:
        return _to_rgb(image), path.name


def _open_hit(path: str) -> Image.Image | None:
    """The gallery image as RGB, or None when it is missing or cannot be decoded."""
    try:
        with Image.open(path) as image:
            return _to_rgb(image)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def _to_rgb(image: Image.Image) -> Image.Image:
    """Upright RGB, with any transparency flattened onto the sheet's background."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, BACKGROUND)
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return image.convert("RGB")


def _header_lines(
    query_name: str, query_text: str, hits: Sequence[Hit], target: str | None, layout: _Layout
) -> list[tuple[str, Colour]]:
    """The header's lines, wrapped to the space beside the query thumbnail, each with its colour."""
    width = layout.header_text_width
    font = layout.header_font
    query = _wrap(f'query: {query_name} + "{query_text}"', font, width)
    if len(query) > MAX_HEADER_LINES:
        query = query[: MAX_HEADER_LINES - 1] + [_ellipsise(query[MAX_HEADER_LINES - 1] + " …", font, width)]
    lines = [(text, INK) for text in query]
    if target is not None:
        rank = next((hit.rank for hit in hits if hit.id == target), None)
        if rank is None:
            where = f"in top-{len(hits)}" if hits else "retrieved"
            lines += [(text, MISSING) for text in _wrap(f"target {target} not {where}", font, width)]
        else:
            lines += [(text, INK) for text in _wrap(f"target {target} at rank #{rank}", font, width)]
    note = f"top-{len(hits)} results" if hits else "no results"
    lines.append((note, MUTED))
    return lines


def _draw_header_text(
    draw: ImageDraw.ImageDraw, lines: list[tuple[str, Colour]], xy: tuple[int, int], layout: _Layout
) -> None:
    x, y = xy
    for text, colour in lines:
        draw.text((x, y), text, font=layout.header_font, fill=colour)
        y += layout.header_line


def _draw_hit(
    sheet: Image.Image, draw: ImageDraw.ImageDraw, hit: Hit, xy: tuple[int, int], layout: _Layout, is_target: bool
) -> None:
    """One result: its framed thumbnail (or placeholder), then rank and score, then id."""
    image = _open_hit(hit.path)
    if image is None:
        image = _placeholder(layout)
    _paste_tile(sheet, draw, image, xy, layout, highlight=is_target)
    if is_target:
        _draw_tab(draw, "target", xy, layout)

    x, y = xy
    y += layout.tile + 3
    score = f"{hit.score:.3f}"
    draw.text((x, y), f"#{hit.rank}", font=layout.font, fill=INK)
    draw.text((x + layout.tile - layout.font.getlength(score), y), score, font=layout.font, fill=MUTED)
    draw.text(
        (x, y + layout.line), _ellipsise(hit.id, layout.font, layout.tile, middle=True), font=layout.font, fill=INK
    )


def _paste_tile(
    sheet: Image.Image,
    draw: ImageDraw.ImageDraw,
    image: Image.Image,
    xy: tuple[int, int],
    layout: _Layout,
    highlight: bool,
) -> None:
    """The image fitted into the thumbnail square, centred, inside a thick green or a thin grey frame."""
    x, y = xy
    fitted = ImageOps.contain(image, (layout.thumb, layout.thumb))
    offset = ((layout.thumb - fitted.width) // 2, (layout.thumb - fitted.height) // 2)
    sheet.paste(fitted, (x + layout.border + offset[0], y + layout.border + offset[1]))
    box = (x, y, x + layout.tile - 1, y + layout.tile - 1)
    if highlight:
        draw.rectangle(box, outline=TARGET, width=layout.border)
    else:
        draw.rectangle(box, outline=FRAME, width=1)


def _draw_tab(draw: ImageDraw.ImageDraw, text: str, xy: tuple[int, int], layout: _Layout) -> None:
    """A small green label hanging from the top-left of a highlighted tile's frame."""
    x, y = xy
    width = int(layout.font.getlength(text)) + 8
    draw.rectangle([x, y, x + width, y + layout.line], fill=TARGET)
    draw.text((x + 4, y + 1), text, font=layout.font, fill=BACKGROUND)


def _placeholder(layout: _Layout) -> Image.Image:
    """A grey square saying "unreadable", standing in for an image that could not be opened."""
    image = Image.new("RGB", (layout.thumb, layout.thumb), PLACEHOLDER)
    draw = ImageDraw.Draw(image)
    draw.text((layout.thumb // 2, layout.thumb // 2), "unreadable", font=layout.font, fill=MUTED, anchor="mm")
    return image


def _wrap(text: str, font: Font, width: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels; a word wider than a line is broken between characters."""
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for word in paragraph.split():
            candidate = f"{line} {word}" if line else word
            if font.getlength(candidate) <= width:
                line = candidate
                continue
            if line:
                lines.append(line)
            line = ""
            for char in word:
                if line and font.getlength(line + char) > width:
                    lines.append(line)
                    line = ""
                line += char
        lines.append(line)
    return lines


def _ellipsise(text: str, font: Font, width: int, middle: bool = False) -> str:
    """``text`` shortened with "…" so it fits in ``width`` pixels (unchanged when it already fits).

    With ``middle``, the ellipsis replaces the middle of the text, keeping both ends (a path's folder and file name).
    """
    if font.getlength(text) <= width:
        return text
    for keep in range(len(text) - 1, 0, -1):
        tail = (keep // 2) if middle else 0
        short = text[: keep - tail] + "…" + text[len(text) - tail :]
        if font.getlength(short) <= width:
            return short
    return "…"


def _save_atomically(image: Image.Image, out: Path) -> Path:
    """Write ``image`` as PNG to ``out`` through a temporary file in the same directory, then rename it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG")
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a picture is meant to be looked at by others too
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out
