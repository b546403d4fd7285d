"""Pseudo-words: token embeddings that no word of the vocabulary has, written into a sentence's placeholders.

Textual inversion (SEARLE, LinCIR, CVSI) and TisCIR's MSMP all turn an embedding into one or more pseudo-word
token embeddings and read a template through the frozen text tower with those tokens in place of a placeholder
word: "a photo of $ that {caption}". The placeholder is an ordinary token of the tokenizer (`$`), so templates
tokenize as usual; its positions are then overwritten in the token-embedding sequence.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from training.model.towers import ClipBackbone

PLACEHOLDER = "$"
"""The word a template marks each pseudo-word with."""


def placeholder_id(tokenize: Callable[[list[str]], torch.Tensor]) -> int:
    """The token id of `PLACEHOLDER` under `tokenize` (one token between start and end of text).

    Raises:
        ValueError: the tokenizer splits the placeholder or has no start token in front of it.
    """
    ids = tokenize([PLACEHOLDER])[0]
    real = ids[ids != 0].tolist()
    if len(real) != 3:
        raise ValueError(f"the tokenizer does not read {PLACEHOLDER!r} as one token between start and end: {real}")
    return int(real[1])


def fill_template(template: str, caption: str) -> str:
    """`template` with its `{caption}` field set; a caption that starts with a capital loses it mid-sentence, and a
    `$` of the caption ("under $20") becomes a word, so the template's placeholder stays the only one."""
    caption = caption.strip().rstrip(".").replace(PLACEHOLDER, "dollar ")  # a `$` of its own would be a second slot
    if caption[:1].isupper() and not caption[1:2].isupper():
        caption = caption[:1].lower() + caption[1:]
    return template.replace("{caption}", caption)


def encode_with_pseudo_words(
    backbone: ClipBackbone, ids: torch.Tensor, words: torch.Tensor, placeholder: int
) -> torch.Tensor:
    """(B, embed_dim) text embeddings of `ids` (B, T) with each placeholder replaced by a pseudo-word.

    Args:
        words: (B, K, text_width), the pseudo-words of each row in order of their placeholders. Every row must hold
            exactly K placeholders (a template with K slots); placeholders cut off by the context are an error.

    Raises:
        ValueError: a row has a different number of placeholders than `words` gives.
    """
    slots = ids == placeholder
    counts = slots.sum(dim=1)
    if words.dim() != 3 or bool((counts != words.shape[1]).any()):
        raise ValueError(
            f"every text must hold {words.shape[1] if words.dim() == 3 else '?'} placeholder(s) {PLACEHOLDER!r}; "
            f"found {sorted(set(counts.tolist()))} (was the template truncated by the 77-token context?)"
        )
    tokens = backbone.token_embedding(ids)
    tokens = tokens.masked_scatter(slots.unsqueeze(-1), words.to(tokens.dtype).reshape(-1, words.shape[-1]))
    states = backbone.encode_text(ids, token_embeddings=tokens)
    return backbone.text_embedding(states, ids)
