"""Scene descriptions: what an image shows, in words, with a box for every noun phrase.

The pretraining objective of the tiny towers (DESIGN section 14) pairs each image with its description and each
object phrase with the image region it names. A description lists the objects in reading order (row by row, left to
right), each as an object NP followed by its place:

    a small red circle at the top left and a large blue square in the center

and its PTB tree nests every "<object> <place>" NP over the object NP and the place NP, so the shard builder's
breadth-first NP walk finds all three kinds. Every NP carries a box (fractions of the canvas): an object NP and an
"<object> <place>" NP the object's box, a place NP its grid cell.
"""

from __future__ import annotations

from dataclasses import dataclass

from shards.synthetic.captions import bracket, char_starts, leaves, node, place_phrase, word
from shards.synthetic.render import object_box
from shards.synthetic.scenes import GRID, Scene

PHRASE_KINDS = ("object", "object_at", "position")


@dataclass(frozen=True)
class DescribedPhrase:
    """One NP of a description."""

    text: str
    char_start: int
    kind: str
    """`object` ("a small red circle"), `object_at` ("a small red circle at the top left") or `position`."""
    box: tuple[float, float, float, float]
    """(x0, y0, x1, y1) as fractions of the canvas."""


@dataclass(frozen=True)
class Description:
    text: str
    tree: str
    """PTB bracket string, `(ROOT ...)`; its leaves joined by spaces equal `text`."""
    phrases: tuple[DescribedPhrase, ...]
    """Every NP below the root, in caption order (outer before inner at one offset)."""


def cell_box(cell: tuple[int, int]) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) of a grid cell as fractions of the canvas."""
    row, column = cell
    return (column / GRID, row / GRID, (column + 1) / GRID, (row + 1) / GRID)


def describe(scene: Scene) -> Description:
    """The description of a scene; deterministic (no randomness: the objects are listed in reading order)."""
    pieces = []
    recorded = []  # (subtree, kind, box)
    for obj in sorted(scene.objects, key=lambda item: item.cell):
        what = node("NP", word("DT", "a"), word("JJ", obj.size), word("JJ", obj.color), word("NN", obj.shape))
        preposition, where = place_phrase(obj.cell)
        whole = node("NP", what, node("PP", preposition, where))
        box = tuple(round(value, 4) for value in object_box(obj))
        recorded += [(whole, "object_at", box), (what, "object", box), (where, "position", cell_box(obj.cell))]
        pieces.append(whole)
    joined = []
    for index, piece in enumerate(pieces):
        if index:
            joined.append(word("CC", "and"))
        joined.append(piece)
    tree = node("ROOT", node("NP", *joined)) if len(pieces) > 1 else node("ROOT", pieces[0])
    starts = char_starts(tree)
    phrases = sorted(
        (
            DescribedPhrase(" ".join(leaves(sub)), starts[id(sub)], kind, tuple(round(v, 4) for v in box))
            for sub, kind, box in recorded
        ),
        key=lambda phrase: (phrase.char_start, -len(phrase.text)),
    )
    return Description(" ".join(leaves(tree)), bracket(tree), tuple(phrases))
