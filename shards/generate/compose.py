"""Stage 4 and the filters: single modifications joined into multi-modification captions, then length, duplicate
and leakage checks, each drop counted under its reason."""

from __future__ import annotations

import hashlib
import itertools
import random
import re
from collections import Counter
from typing import Any

TOO_SHORT = "too_short"
DUPLICATE = "duplicate"
LEAKS_TARGET = "leaks_target"
_WORD = re.compile(r"[a-z0-9]+")


def pair_rng(seed: int, pair_id: str) -> random.Random:
    """A generator that depends on the seed and the pair only, not on which worker or in which order it runs."""
    return random.Random(int.from_bytes(hashlib.sha256(f"{seed}:{pair_id}".encode()).digest()[:8], "big"))


def _clean(text: str) -> str:
    return " ".join(text.strip().rstrip(".").split())


def compose_captions(modifications: list[str], max_k: int, count: int, rng: random.Random) -> list[str]:
    """Up to `count` captions: each single modification, then seeded joins of 2..K of them with " and "."""
    singles = list(dict.fromkeys(_clean(text) for text in modifications if _clean(text)))
    captions = list(singles)
    for k in range(2, min(max_k, len(singles)) + 1):
        combinations = list(itertools.combinations(range(len(singles)), k))
        rng.shuffle(combinations)
        for chosen in combinations[: max(1, count)]:
            order = list(chosen)
            rng.shuffle(order)
            captions.append(" and ".join(singles[i] for i in order))
    if len(captions) <= count:
        return captions
    # Keep the longest join (the whole difference when K allows it), then a seeded choice of the rest.
    longest = max(captions, key=lambda text: (text.count(" and "), text))
    rest = [text for text in captions if text != longest]
    return [longest, *rng.sample(rest, count - 1)]


def _words(text: str) -> set[str]:
    return set(_WORD.findall(text.lower()))


def leaks_target(caption: str, target_objects: list[dict[str, Any]]) -> bool:
    """True when the caption names every object of the target with all its descriptors: it then describes the whole
    target, and text alone could find it without looking at the reference."""
    if not target_objects:
        return False
    words = _words(caption)
    return all(
        _words(obj["name"]) <= words and all(_words(d) <= words for d in obj["descriptors"]) for obj in target_objects
    )


def filter_captions(
    captions: list[str],
    target_objects: list[dict[str, Any]],
    min_words: int,
    dedupe: bool,
    leakage: bool,
    seen: set[str] | None = None,
) -> tuple[list[str], Counter]:
    """The captions kept and the drops by reason. `seen` (shared across a pair's captions) dedupes within the pair."""
    kept, dropped = [], Counter()
    seen = set() if seen is None else seen
    for caption in captions:
        if len(caption.split()) < min_words:
            dropped[TOO_SHORT] += 1
        elif dedupe and caption.lower() in seen:
            dropped[DUPLICATE] += 1
        elif leakage and leaks_target(caption, target_objects):
            dropped[LEAKS_TARGET] += 1
        else:
            kept.append(caption)
            seen.add(caption.lower())
    return kept, dropped
