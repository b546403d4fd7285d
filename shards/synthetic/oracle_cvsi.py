"""The scene oracle's answers to CVSI's two questions (`training.zeroshot.cvsi_texts`), from the recorded scenes.

- `cvsi_captions` (one image): the image's first `count` captions from `scene_captions`: its scene description,
  the objects it shows, where each one is, ... (the count is the `count: N` line of the request's text).
- `cvsi_edit` (text only): the request quotes a reference's captions (`captions: [...]`, JSON) and a modification
  text (`modification: "..."`, JSON). The oracle finds the reference by its first caption, which is the image's
  scene description (a reverse index description -> images of `objects.json`), keeping the candidates whose every
  caption it would have written. When the synthetic benchmark holds that (reference, modification text) as a
  triplet with a target (train and val of `cirr/captions`; test1 has no targets), it answers the target's captions
  and the objects of the target whose (colour, shape) the reference lacks. Offline it is therefore a perfect editor
  on benchmark triplets: an upper bound of the LLM stage, not an estimate of it. Otherwise it answers the captions
  unchanged with ", then <modification>" appended, and nothing added.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shards.synthetic.captions import leaves, node, place_phrase
from shards.synthetic.scenes import CELL_NAMES

CVSI_STAGES = ("cvsi_captions", "cvsi_edit")
MAX_CAPTIONS = 20
"""Most captions one `cvsi_captions` request may ask for."""
_COUNT = re.compile(r"^count:\s*(\d+)\s*$", re.MULTILINE)
_CAPTIONS = re.compile(r"^captions:\s*(\[.*\])\s*$", re.MULTILINE)
_MODIFICATION = re.compile(r"^modification:\s*(\".*\")\s*$", re.MULTILINE)
_CELLS = {name: cell for cell, name in CELL_NAMES.items()}
_NUMBERS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


class RequestUnreadable(ValueError):
    """A CVSI request without the fields the oracle reads; the message says which."""


def _place(position: str) -> str:
    """ "at the top left", "in the center", "on the left": the same words as the scene descriptions."""
    return " ".join(leaves(node("PP", *place_phrase(_CELLS[position]))))


def _joined(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _reading_order(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(objects, key=lambda obj: (_CELLS[obj["position"]], obj["shape"], obj["color"]))


def scene_captions(image: dict[str, Any], count: int) -> list[str]:
    """`count` different captions of an image (its `objects.json` entry), deterministic; the first is always its
    scene description, and the captions for `count` are a prefix of those for `count + 1`."""
    objects = _reading_order(image["objects"])
    named = [f"{obj['color']} {obj['shape']}" for obj in objects]
    number = _NUMBERS[len(objects)] if len(objects) < len(_NUMBERS) else str(len(objects))
    noun = "shape" if len(objects) == 1 else "shapes"
    styles = [
        image["description"],
        f"a picture of {number} {noun}: " + _joined([f"a {name}" for name in named]),
        _joined([f"the {name} is {_place(obj['position'])}" for name, obj in zip(named, objects)]),
        f"a {image.get('background', 'white')} canvas with "
        + _joined([f"a {o['size']} {n}" for n, o in zip(named, objects)]),
    ]
    others = len(objects) - 1
    for name, obj in zip(named, objects):
        company = f" and {_NUMBERS[others]} other {'shape' if others == 1 else 'shapes'}" if others else " alone"
        styles.append(f"a {obj['size']} {name} {_place(obj['position'])}{company}")
    captions = styles[:count]
    for index in range(len(styles), count):  # more captions than ways of saying it: number the repeats
        captions.append(f"{styles[index % len(styles)]} (caption {index + 1})")
    return captions


def added_objects(reference: dict[str, Any], target: dict[str, Any]) -> list[str]:
    """The target's objects whose (colour, shape) the reference has none of, as "blue triangle", in reading order."""
    present = {(obj["color"], obj["shape"]) for obj in reference["objects"]}
    return [
        f"{obj['color']} {obj['shape']}"
        for obj in _reading_order(target["objects"])
        if (obj["color"], obj["shape"]) not in present
    ]


def _normalised(text: str) -> str:
    return " ".join(text.lower().split())


def _field(pattern: re.Pattern, texts: list[str], name: str) -> str:
    """The first match of `pattern` in the request's user texts (a repair turn repeats none of them)."""
    for text in texts:
        found = pattern.search(text)
        if found:
            return found.group(1)
    raise RequestUnreadable(f"the request has no `{name}` line")


def caption_count(texts: list[str]) -> int:
    """The `count: N` of a `cvsi_captions` request."""
    count = int(_field(_COUNT, texts, "count: N"))
    if not 1 <= count <= MAX_CAPTIONS:
        raise RequestUnreadable(f"count must be within 1..{MAX_CAPTIONS}, got {count}")
    return count


@dataclass
class CVSIAnswers:
    """What `cvsi_edit` needs of a benchmark root: every image's entry, the reverse index, the triplets."""

    images: dict[str, dict[str, Any]]
    """Image name -> its `objects.json` entry."""
    by_description: dict[str, list[str]]
    """Scene description -> the images it describes (several when two scenes read the same)."""
    targets: dict[tuple[str, str], str]
    """(reference image, normalised modification text) -> target image, for every triplet with a target."""

    @classmethod
    def from_root(cls, root: str | Path, images: dict[str, dict[str, Any]]) -> CVSIAnswers:
        by_description: dict[str, list[str]] = {}
        for name in sorted(images):
            by_description.setdefault(images[name]["description"], []).append(name)
        targets = {}
        for caption_file in sorted((Path(root) / "cirr" / "captions").glob("cap.rc2.*.json")):
            for entry in json.loads(caption_file.read_text()):
                if entry.get("target_hard") in images:
                    targets[(entry["reference"], _normalised(entry["caption"]))] = entry["target_hard"]
        return cls(images, by_description, targets)

    def edit(self, texts: list[str]) -> dict[str, Any]:
        """The `cvsi_edit` answer `{"captions", "added"}` for a request's user texts."""
        try:
            captions = json.loads(_field(_CAPTIONS, texts, "captions: [...]"))
            modification = json.loads(_field(_MODIFICATION, texts, 'modification: "..."'))
        except ValueError as error:
            if isinstance(error, RequestUnreadable):
                raise
            raise RequestUnreadable(f"captions or modification is not JSON ({error})") from None
        if not (isinstance(captions, list) and captions and all(isinstance(c, str) for c in captions)):
            raise RequestUnreadable("captions must be a non-empty list of strings")
        if not isinstance(modification, str):
            raise RequestUnreadable("modification must be a string")
        for reference in self.references(captions):
            target = self.targets.get((reference, _normalised(modification)))
            if target is not None:
                return {
                    "captions": scene_captions(self.images[target], len(captions)),
                    "added": added_objects(self.images[reference], self.images[target]),
                }
        text = modification.strip().rstrip(".")
        return {"captions": [f"{caption}, then {text}" for caption in captions], "added": []}

    def references(self, captions: list[str]) -> list[str]:
        """The images whose first `len(captions)` oracle captions are exactly `captions`."""
        candidates = self.by_description.get(captions[0], [])
        if len(captions) > MAX_CAPTIONS:
            return []
        return [name for name in candidates if scene_captions(self.images[name], len(captions)) == captions]
