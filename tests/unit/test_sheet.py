"""Contact sheets: written as PNG, grow with the results, frame the target in green, survive unreadable files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from training.retrieval.hit import Hit
from training.retrieval.sheet import contact_sheet

# No test image is green, so any green on a sheet comes from the target's frame.
PALETTE = [(200, 40, 40), (40, 60, 200), (230, 140, 20), (120, 120, 120), (150, 60, 160), (40, 170, 200)]


def _image(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (90, 60)) -> Path:
    image = Image.new("RGB", size, colour)
    ImageDraw.Draw(image).ellipse([10, 10, size[0] - 10, size[1] - 10], fill=(250, 250, 250))
    image.save(path)
    return path


def _hits(folder: Path, n: int) -> list[Hit]:
    folder.mkdir(exist_ok=True)
    hits = []
    for i in range(n):
        path = _image(folder / f"g{i}.png", PALETTE[i % len(PALETTE)], size=(60 + 10 * i, 80))
        hits.append(Hit(rank=i + 1, id=f"gallery_{i}", path=str(path), score=0.9 - 0.05 * i))
    return hits


def _green_pixels(path: Path) -> int:
    rgb = np.asarray(Image.open(path).convert("RGB")).astype(int)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return int(((g > 180) & (r < 80) & (b < 80)).sum())


@pytest.fixture
def query(tmp_path: Path) -> Path:
    return _image(tmp_path / "query.png", (180, 90, 60), size=(120, 70))


def test_sheet_is_a_png_that_grows_with_the_rows(tmp_path: Path, query: Path) -> None:
    out5 = tmp_path / "nested" / "dir" / "five.png"
    written = contact_sheet(query, "make it blue", _hits(tmp_path / "g", 5), out5, columns=5)
    out12 = contact_sheet(query, "make it blue", _hits(tmp_path / "g", 12), tmp_path / "twelve.png", columns=5)

    assert written == out5 and out5.is_file()
    assert out5.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out5) as five, Image.open(out12) as twelve:
        assert five.format == twelve.format == "PNG"
        assert five.width == twelve.width
        assert twelve.height > five.height  # 3 rows of results against 1
    assert sorted(p.name for p in out5.parent.iterdir()) == ["five.png"]  # no temporary file left behind


def test_target_tile_is_framed_in_green(tmp_path: Path, query: Path) -> None:
    hits = _hits(tmp_path / "g", 7)
    with_target = contact_sheet(query, "make it blue", hits, tmp_path / "target.png", target="gallery_3", thumb=96)
    without = contact_sheet(query, "make it blue", hits, tmp_path / "plain.png", thumb=96)
    absent = contact_sheet(query, "make it blue", hits, tmp_path / "absent.png", target="nope", thumb=96)

    assert _green_pixels(with_target) > 4 * 96  # a frame several pixels thick round a 96-pixel tile
    assert _green_pixels(without) == 0
    assert _green_pixels(absent) == 0


def test_target_frame_surrounds_the_target_tile(tmp_path: Path, query: Path) -> None:
    hits = _hits(tmp_path / "g", 5)
    out = contact_sheet(query, "q", hits, tmp_path / "s.png", target="gallery_2", columns=5, thumb=64)
    rgb = np.asarray(Image.open(out).convert("RGB")).astype(int)
    green = (rgb[..., 1] > 180) & (rgb[..., 0] < 80) & (rgb[..., 2] < 80)
    _, xs = np.nonzero(green)
    with Image.open(out) as sheet:
        width = sheet.width
    # Tile 3 of 5 sits in the middle of the row: every green pixel is in the sheet's middle fifth or so.
    assert width * 0.3 < xs.min() < xs.max() < width * 0.7


def test_unreadable_hit_gets_a_placeholder(tmp_path: Path, query: Path) -> None:
    hits = _hits(tmp_path / "g", 3)
    broken = tmp_path / "broken.png"
    broken.write_text("this is not an image")
    hits.append(Hit(rank=4, id="broken", path=str(broken), score=0.1))
    hits.append(Hit(rank=5, id="gone", path=str(tmp_path / "missing.png"), score=0.05))

    out = contact_sheet(query, "anything", hits, tmp_path / "s.png", target="broken")
    with Image.open(out) as sheet:
        sheet.verify()
    assert _green_pixels(out) > 0  # the placeholder still carries the target's frame


def test_missing_query_image_raises(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_query.png"
    with pytest.raises(FileNotFoundError, match="no_such_query.png"):
        contact_sheet(missing, "text", _hits(tmp_path / "g", 2), tmp_path / "s.png")
    assert not (tmp_path / "s.png").exists()


def test_empty_results_and_pil_query(tmp_path: Path) -> None:
    query = Image.new("RGBA", (50, 100), (20, 20, 200, 128))
    long_text = "replace the dress with a much longer one " * 8 + "averyveryverylongwordwithoutspaces" * 3
    out = contact_sheet(query, long_text, [], tmp_path / "empty.png", target="gallery_0")
    with Image.open(out) as sheet:
        assert sheet.format == "PNG" and sheet.width > 0 and sheet.height > 0


def test_bad_layout_arguments_are_rejected(tmp_path: Path, query: Path) -> None:
    with pytest.raises(ValueError, match="columns"):
        contact_sheet(query, "q", [], tmp_path / "s.png", columns=0)
    with pytest.raises(ValueError, match="thumb"):
        contact_sheet(query, "q", [], tmp_path / "s.png", thumb=4)
