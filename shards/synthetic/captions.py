"""Modification captions and their PTB trees, generated together from one small grammar.

Every caption is built as a constituency tree first; the caption text is its leaves joined by single spaces, so
the two can never disagree. Captions are lower case without punctuation. Object mentions are NPs such as
(NP (DT the) (JJ red) (NN circle)); the caption records every NP it builds with what the NP names: an object of the
reference image (`present`), an object the edit creates (`added`, grounded on the cell it goes to), a grid cell
(`position`), or something else (`other`: "the colour", or "the colour of the red circle", grounded on the object).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from shards.synthetic.scenes import CELL_NAMES, Edit, Scene, SceneObject

Tree = tuple[str, tuple]
"""(label, children); a child is a Tree or, under a part-of-speech tag, a word."""

SHAPE_ONLY_PROBABILITY = 0.3
"""How often an object whose shape is unique is named by its shape alone ("the circle")."""
SIZE_ADJECTIVE_PROBABILITY = 0.2
"""How often a mention carries its (redundant) size adjective ("the small red circle")."""


MENTION_KINDS = ("present", "added", "position", "other")


@dataclass(frozen=True)
class Mention:
    """An NP of the caption and what it names."""

    text: str
    object_id: str | None
    """The reference object the NP names (`present`) or is about (`other`); None otherwise."""
    char_start: int
    """Character offset of the NP in the caption text."""
    kind: str = "present"
    """One of MENTION_KINDS."""
    cell: tuple[int, int] | None = None
    """The grid cell an `added` object goes to or a `position` NP names."""


@dataclass(frozen=True)
class Caption:
    text: str
    tree: str
    """PTB bracket string, `(ROOT ...)`; its leaves joined by spaces equal `text`."""
    mentions: tuple[Mention, ...]


def node(label: str, *children) -> Tree:
    return (label, children)


def word(tag: str, token: str) -> Tree:
    return (tag, (token,))


def leaves(tree: Tree) -> list[str]:
    """The words of a tree, left to right."""
    _, children = tree
    out: list[str] = []
    for child in children:
        out.extend([child] if isinstance(child, str) else leaves(child))
    return out


def bracket(tree: Tree) -> str:
    """PTB bracket notation of a tree."""
    label, children = tree
    inner = " ".join(child if isinstance(child, str) else bracket(child) for child in children)
    return f"({label} {inner})"


class _CaptionBuilder:
    """Builds the verb phrase of each edit, recording object mentions on the way."""

    def __init__(self, rng: random.Random, reference: Scene, ambiguous_shapes: set[str]) -> None:
        self.rng = rng
        self.reference = reference
        self.ambiguous_shapes = ambiguous_shapes
        self.mentions: list[tuple[Tree, str | None, str, tuple[int, int] | None]] = []
        """(NP subtree, object id, kind, cell) of every NP built, in building order."""

    def mention(self, subject: SceneObject) -> Tree:
        """A definite NP that names `subject` uniquely in the reference (and stays unique after the edits)."""
        words = [word("DT", "the")]
        if self.rng.random() < SIZE_ADJECTIVE_PROBABILITY:
            words.append(word("JJ", subject.size))
        if subject.shape in self.ambiguous_shapes or self.rng.random() >= SHAPE_ONLY_PROBABILITY:
            words.append(word("JJ", subject.color))
        words.append(word("NN", subject.shape))
        phrase = node("NP", *words)
        self.mentions.append((phrase, subject.id, "present", None))
        return phrase

    def new_object(self, edit: Edit, with_size: bool, cell: tuple[int, int]) -> Tree:
        """An indefinite NP for the object an edit creates at `cell`."""
        words = [word("DT", "a")] + ([word("JJ", edit.size)] if with_size else [])
        phrase = node("NP", *words, word("JJ", edit.color), word("NN", edit.shape))
        self.mentions.append((phrase, None, "added", cell))
        return phrase

    def place(self, cell: tuple[int, int]) -> Tree:
        """The PP naming a grid cell ("at the top left"); its NP is recorded as a `position` mention."""
        preposition, noun_phrase = place_phrase(cell)
        self.mentions.append((noun_phrase, None, "position", cell))
        return node("PP", preposition, noun_phrase)

    def verb_phrase(self, edit: Edit) -> Tree:
        choice = self.rng.randrange
        subject = self.reference.by_id(edit.subject) if edit.subject is not None else None
        if edit.kind == "replace":
            verb, preposition = [("replace", "with"), ("swap", "for"), ("turn", "into")][choice(3)]
            return node(
                "VP",
                word("VB", verb),
                self.mention(subject),
                node("PP", word("IN", preposition), self.new_object(edit, with_size=False, cell=subject.cell)),
            )
        if edit.kind == "recolour":
            colour = node("ADJP", word("JJ", edit.color))
            style = choice(4)
            if style == 3:
                the_colour = node("NP", word("DT", "the"), word("NN", "colour"))
                of_subject = node("NP", the_colour, node("PP", word("IN", "of"), self.mention(subject)))
                self.mentions += [(the_colour, None, "other", None), (of_subject, subject.id, "other", None)]
                return node("VP", word("VB", "change"), of_subject, node("PP", word("TO", "to"), colour))
            verb = ("make", "paint", "turn")[style]
            return node("VP", word("VB", verb), node("S", self.mention(subject), colour))
        if edit.kind == "add":
            verb = ("add", "put", "place")[choice(3)]
            return node("VP", word("VB", verb), self.new_object(edit, True, edit.cell), self.place(edit.cell))
        if edit.kind == "remove":
            style = choice(3)
            if style == 2:
                return node("VP", word("VB", "take"), node("PRT", word("RP", "away")), self.mention(subject))
            return node("VP", word("VB", ("remove", "delete")[style]), self.mention(subject))
        # resize
        grow = edit.size == "large"
        if choice(3) == 0:
            return node("VP", word("VB", "enlarge" if grow else "shrink"), self.mention(subject))
        comparative = self.rng.choice(("bigger", "larger") if grow else ("smaller",))
        return node("VP", word("VB", "make"), node("S", self.mention(subject), node("ADJP", word("JJR", comparative))))


def place_phrase(cell: tuple[int, int]) -> tuple[Tree, Tree]:
    """(preposition, NP) naming a grid cell: ("at", "the top left"), ("in", "the center"), ("on", "the left")."""
    name = CELL_NAMES[cell].split()
    preposition = "in" if name == ["center"] else "on" if name in (["left"], ["right"]) else "at"
    noun_phrase = [word("DT", "the")] + [word("JJ", w) for w in name[:-1]] + [word("NN", name[-1])]
    return word("IN", preposition), node("NP", *noun_phrase)


def compose_caption(rng: random.Random, reference: Scene, edits: list[Edit] | tuple[Edit, ...]) -> Caption:
    """The caption (text, tree, mentions) asking for `edits` applied to `reference`, in a random order."""
    order = list(edits)
    rng.shuffle(order)
    # Shape-only mentions ("the circle") are allowed only when no other object of the reference, and nothing the
    # caption creates, has that shape.
    shape_counts: dict[str, int] = {}
    for obj in reference.objects:
        shape_counts[obj.shape] = shape_counts.get(obj.shape, 0) + 1
    ambiguous = {shape for shape, count in shape_counts.items() if count > 1}
    ambiguous |= {edit.shape for edit in order if edit.shape is not None}
    builder = _CaptionBuilder(rng, reference, ambiguous)
    phrases = [builder.verb_phrase(edit) for edit in order]
    if len(phrases) == 1:
        top = phrases[0]
    else:
        joined: list[Tree] = []
        for index, phrase in enumerate(phrases):
            if index:
                joined.append(word("CC", "and"))
            joined.append(phrase)
        top = node("VP", *joined)
    tree = node("ROOT", node("S", top))
    starts = char_starts(tree)
    mentions = tuple(
        sorted(
            (
                Mention(" ".join(leaves(phrase)), object_id, starts[id(phrase)], kind, cell)
                for phrase, object_id, kind, cell in builder.mentions
            ),
            key=lambda mention: (mention.char_start, -len(mention.text)),
        )
    )
    return Caption(" ".join(leaves(tree)), bracket(tree), mentions)


def char_starts(tree: Tree) -> dict[int, int]:
    """Character offset in the caption of every constituent, keyed by the constituent's id()."""
    starts: dict[int, int] = {}
    cursor = 0

    def visit(subtree: Tree) -> None:
        nonlocal cursor
        starts[id(subtree)] = cursor
        for child in subtree[1]:
            if isinstance(child, str):
                cursor += len(child) + 1  # the word and the space after it
            else:
                visit(child)

    visit(tree)
    return starts
