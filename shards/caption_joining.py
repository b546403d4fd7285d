"""Turning several relative captions of one image pair into one query text.

Shared by the shard builder (training sources) and the evaluation benchmarks, so that a caption template is
written once and training and scoring read the same text.
"""

from __future__ import annotations

from collections.abc import Sequence

FASHIONIQ_CATEGORIES = ("dress", "shirt", "toptee")


def fashioniq_text(captions: Sequence[str]) -> str:
    """Join FashionIQ's two relative captions the way the benchmark's evaluations do.

    `"{c0.strip('.?, ').capitalize()} and {c1.strip('.?, ')}"`.

    Raises:
        ValueError: not exactly two captions.
    """
    if len(captions) != 2:
        raise ValueError(f"a FashionIQ query has two captions, got {len(captions)}: {captions!r}")
    first, second = captions
    return f"{first.strip('.?, ').capitalize()} and {second.strip('.?, ')}"


def join_captions(captions: Sequence[str], joiner: str) -> str:
    """One caption from several single-modification captions (CIRR_R's `difference_captions`).

    Each caption loses its surrounding whitespace and a trailing period first, since the released captions are
    sentences ("Remove the lamp.") and "Remove the lamp. and ..." would be a caption no user types.
    """
    return joiner.join(caption.strip().rstrip(".").rstrip() for caption in captions)
