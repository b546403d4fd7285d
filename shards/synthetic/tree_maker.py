"""PTB trees for edit instructions in the synthetic benchmark's closed vocabulary, such as the scene oracle's
("remove the red circle and add a small blue square at the top left").

Stanza's English models cannot be fetched everywhere, and `data.noun_phrases.parser: trees` needs a tree for each
caption. For the synthetic world a lexicon and a clause pattern suffice: clauses joined by "and", each a verb
followed by noun phrases, prepositional phrases and adjective phrases. A caption with a word outside the lexicon
gets no tree (None), so its triplet is built without noun phrases rather than with wrong ones.
"""

from __future__ import annotations

from shards.synthetic.render import PALETTE, SHAPES
from shards.synthetic.scenes import CELL_NAMES, SIZES

VERBS = frozenset(
    {"add", "remove", "make", "move", "put", "place", "delete", "take", "enlarge", "shrink", "change", "turn"}
)
PREPOSITIONS = frozenset({"at", "in", "on", "of", "to", "into", "away"})
COMPARATIVES = frozenset({"larger", "bigger", "smaller"})
_PLACE_HEADS = {name.split()[-1] for name in CELL_NAMES.values()}
_PLACE_MODIFIERS = {word for name in CELL_NAMES.values() for word in name.split()[:-1]}
_ADJECTIVES = set(SIZES) | set(PALETTE)
_NOUNS = set(SHAPES) | _PLACE_HEADS | {"colour", "color", "object", "shape"}


def _np(words: list[str]) -> str:
    """An NP subtree: determiner, modifiers, head noun (the last word)."""
    *modifiers, head = words
    parts = [f"(DT {modifiers.pop(0)})"] if modifiers and modifiers[0] in ("a", "an", "the") else []
    parts += [f"(JJ {word})" for word in modifiers] + [f"(NN {head})"]
    return f"(NP {' '.join(parts)})"


def _take_np(words: list[str], at: int) -> tuple[str, int] | None:
    """The NP starting at `at` (DT? JJ* NN) and the position after it, or None."""
    end = at + 1 if at < len(words) and words[at] in ("a", "an", "the") else at
    while end < len(words) and (words[end] in _ADJECTIVES or words[end] in _PLACE_MODIFIERS):
        if words[end] in _PLACE_MODIFIERS and (end + 1 == len(words) or words[end + 1] not in _PLACE_HEADS):
            break  # "top" is the head itself in "at the top"
        end += 1
    if end >= len(words) or words[end] not in _NOUNS:
        return None
    return _np(words[at : end + 1]), end + 1


def _clause(words: list[str]) -> str | None:
    if not words or words[0] not in VERBS:
        return None
    verb, at, parts = words[0], 1, []
    while at < len(words):
        word = words[at]
        if word in PREPOSITIONS:
            taken = _take_np(words, at + 1)
            if taken is None:
                if at + 1 < len(words) and words[at + 1] in _ADJECTIVES:  # "to red"
                    parts.append(f"(PP (TO {word}) (ADJP (JJ {words[at + 1]})))")
                    at += 2
                    continue
                return None
            parts.append(f"(PP (IN {word}) {taken[0]})")
            at = taken[1]
        elif word in COMPARATIVES or (word in _ADJECTIVES and parts):
            tag = "JJR" if word in COMPARATIVES else "JJ"
            parts.append(f"(ADJP ({tag} {word}))")
            at += 1
        else:
            taken = _take_np(words, at)
            if taken is None:
                return None
            parts.append(taken[0])
            at = taken[1]
    if verb in ("make", "turn") and len(parts) == 2 and parts[1].startswith("(ADJP"):
        return f"(VP (VB {verb}) (S {parts[0]} {parts[1]}))"
    return f"(VP (VB {verb}) {' '.join(parts)})"


def synthetic_tree(caption: str) -> str | None:
    """The PTB bracket tree of `caption`, or None when it is outside the synthetic vocabulary."""
    words = caption.lower().split()
    clauses: list[list[str]] = [[]]
    for position, word in enumerate(words):
        if word == "and" and position + 1 < len(words) and words[position + 1] in VERBS and clauses[-1]:
            clauses.append([])
        else:
            clauses[-1].append(word)
    subtrees = [_clause(clause) for clause in clauses]
    if any(subtree is None for subtree in subtrees):
        return None
    if len(subtrees) == 1:
        return f"(ROOT (S {subtrees[0]}))"
    joined = " (CC and) ".join(subtrees)  # type: ignore[arg-type]
    return f"(ROOT (S (VP {joined})))"
