"""The triplet every raw-dataset reader returns, its error, and the annotation-file helpers the readers share."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class SourceError(ValueError):
    """An annotation file that is missing or cannot be read as its source kind; the message names the file."""


@dataclass(frozen=True, slots=True)
class Triplet:
    """(reference image, modification caption, target image) of one raw dataset."""

    id: str
    """Stable id: `<source name>-<native id>` (pairid, qid, manifest id, or the entry's position in its file)."""
    source: str
    """Name of the source (`SourceConfig.name`)."""
    caption: str
    reference_name: str
    """The dataset's own name of the reference image (CIRR image name, COCO path, url, manifest path)."""
    target_name: str
    reference_path: str | None
    """Resolved image file; None when the dataset's image list does not know `reference_name`."""
    target_path: str | None
    phrase_boxes: tuple[tuple[str, tuple[float, float, float, float]], ...] = ()
    """(NP text, box) pairs the source knows: the region of the reference image an NP names, as (x0, y0, x1, y1)
    fractions. The shard builder stores the box of every extracted NP whose text is listed (JSONL `phrases`)."""


def phrase_boxes(phrases: Any, where: str) -> tuple[tuple[str, tuple[float, float, float, float]], ...]:
    """The optional `phrases` of a manifest entry: `[{"text", "box": [x0, y0, x1, y1]}, ...]`, boxes as fractions.

    Raises:
        SourceError: not a list of such objects (the message starts with `where` and names the bad item).
    """
    if not isinstance(phrases, list):
        raise SourceError(f"{where}: 'phrases' must be a list of {{'text', 'box'}} objects")
    boxes = []
    for index, phrase in enumerate(phrases):
        box = phrase.get("box") if isinstance(phrase, dict) else None
        valid = (
            isinstance(box, list)
            and len(box) == 4
            and all(isinstance(v, (int, float)) and 0 <= v <= 1 for v in box)
            and box[0] <= box[2]
            and box[1] <= box[3]
            and isinstance(phrase.get("text"), str)
        )
        if not valid:
            raise SourceError(
                f"{where}: phrases[{index}] must be {{'text': str, 'box': [x0, y0, x1, y1]}} with fractions in "
                f"[0, 1], x0 <= x1 and y0 <= y1; got {phrase!r}"
            )
        boxes.append((phrase["text"], tuple(float(v) for v in box)))
    return tuple(boxes)


def load_json(path: Path, what: str) -> Any:
    """The parsed JSON of an annotation file.

    Raises:
        SourceError: the file is missing (message: `<what> not found: <path>`) or not valid JSON.
    """
    if not path.is_file():
        raise SourceError(f"{what} not found: {path}")
    try:
        with path.open(encoding="utf-8") as handle:
            return json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SourceError(f"{path}: not valid JSON ({error})") from error


def load_json_list(path: Path, what: str) -> list:
    """An annotation file that holds a JSON list of entries.

    Raises:
        SourceError: the file is missing, not valid JSON, or not a list.
    """
    return list(iter_json_list(path, what))


_READ_CHARS = 1 << 20
_WHITESPACE = " \t\n\r"
_AFTER_ENTRY = _WHITESPACE + ",]"


def iter_json_list(path: Path, what: str, read_chars: int = _READ_CHARS) -> Iterator[Any]:
    """The entries of a JSON list file one at a time, reading about `read_chars` characters at a time: a 1M-entry
    annotation file never sits in memory as a million dicts at once.

    Raises:
        SourceError: the file is missing (`<what> not found: <path>`), not valid JSON, or not a list.
    """
    if not path.is_file():  # now, not at the first entry: the caller's order of checks holds
        raise SourceError(f"{what} not found: {path}")
    return _json_list_entries(path, read_chars)


def _json_list_entries(path: Path, read_chars: int) -> Iterator[Any]:
    decoder = json.JSONDecoder()
    try:
        with path.open(encoding="utf-8") as handle:
            buffer, position, ended = "", 0, False

            def next_character() -> str:
                """The next non-whitespace character (reading on as needed); '' at the end of the file."""
                nonlocal buffer, position, ended
                while True:
                    while position < len(buffer) and buffer[position] in _WHITESPACE:
                        position += 1
                    if position < len(buffer) or ended:
                        return buffer[position] if position < len(buffer) else ""
                    more = handle.read(read_chars)
                    buffer, position, ended = buffer[position:] + more, 0, not more

            first = next_character()
            if first != "[":
                if first in '{"-0123456789tfn' and first:
                    raise SourceError(f"{path}: expected a JSON list of entries")
                raise SourceError(f"{path}: not valid JSON (expected '[' at the start)")
            position += 1
            if next_character() == "]":
                position += 1
            else:
                while True:
                    next_character()
                    while True:
                        try:
                            entry, end = decoder.raw_decode(buffer, position)
                            # A number cut by the buffer's end decodes short ("-1500." as -1500): accept an entry
                            # only when what follows it is in the buffer and may follow an entry.
                            if ended or (end < len(buffer) and buffer[end] in _AFTER_ENTRY):
                                break
                        except json.JSONDecodeError:
                            if ended:
                                raise
                        more = handle.read(read_chars)
                        buffer, position, ended = buffer[position:] + more, 0, not more
                    position = end
                    yield entry
                    separator = next_character()
                    position += 1
                    if separator == "]":
                        break
                    if separator != ",":
                        raise SourceError(f"{path}: not valid JSON (expected ',' or ']' after an entry)")
            if next_character():
                raise SourceError(f"{path}: not valid JSON (data after the list)")
    except json.JSONDecodeError as error:
        raise SourceError(f"{path}: not valid JSON ({error.msg})") from error
    except UnicodeDecodeError as error:
        raise SourceError(f"{path}: not valid JSON ({error})") from error


def resolve(root: Path, relative: str) -> str:
    """`relative` under `root`, normalised (no `./`, no `..` left in the middle)."""
    return os.path.normpath(root / relative)


def require(entry: Any, keys: Sequence[str], where: str) -> None:
    """Check that `entry` is an object holding `keys`.

    Raises:
        SourceError: it is not an object, or keys are missing; the message starts with `where`.
    """
    if not isinstance(entry, dict):
        raise SourceError(f"{where}: expected an object, got {type(entry).__name__}")
    missing = [key for key in keys if key not in entry]
    if missing:
        raise SourceError(f"{where}: missing key(s) {missing}")


def require_text(entry: dict, key: str, where: str) -> str:
    """`entry[key]`, which must be a non-empty string.

    Raises:
        SourceError: it is another type or blank; the message names `where` and the key.
    """
    value = entry[key]
    if not isinstance(value, str):
        raise SourceError(f"{where}: {key!r} must be a string, got {type(value).__name__} {value!r}")
    if not value.strip():
        raise SourceError(f"{where}: {key!r} is empty")
    return value
