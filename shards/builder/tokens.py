"""Caption token ids, noun-phrase token spans from character offsets, and each noun phrase tokenized alone.

CLIP's BPE tokenizer cleans the text (ftfy, HTML unescaping, whitespace, lower case), splits it into words with a
regex and encodes each word on its own. Replaying those steps word by word, with each word's character range in
the original caption, gives every BPE token a character range, so a noun phrase's `[start, end)` characters map to
exactly its own tokens, even when the same words occur earlier in the caption. Every caption is checked against
the tokenizer's own ids; a caption where the replay disagrees keeps its ids but loses its spans (counted).
"""

from __future__ import annotations

import difflib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import open_clip
import regex

from shards.builder.noun_phrases import NounPhrase
from shards.model_inputs import CONTEXT_LENGTH, tokenizer

# Reasons a noun phrase gets no span; `truncated` is the one the index reports as truncated_nps.
TRUNCATED = "truncated"
MISALIGNED = "misaligned"
TOO_LONG = "too_long"
MISMATCH = "np_mismatch"
TOKENIZER_MISMATCH = "tokenizer_mismatch"


@dataclass(frozen=True)
class WordPiece:
    """One regex word of the cleaned caption: its character range in the original caption and its BPE ids."""

    start: int
    end: int
    ids: tuple[int, ...]


@dataclass
class CaptionTokens:
    """Token arrays of one caption, ready for `shards.format.encode_sample`."""

    caption_ids: np.ndarray
    """int32 (77,): start token, BPE ids, end token (at 76 when truncated), zero padding."""
    np_spans: np.ndarray
    """int32 (k, 2): `[start, end)` positions in `caption_ids` of each kept noun phrase's own tokens."""
    np_ids: np.ndarray
    """int32 (k, np_length): each kept noun phrase tokenized alone, start and end tokens included, zero padded."""
    noun_phrases: list[str]
    """Texts of the kept noun phrases, aligned with the rows above."""
    dropped: Counter = field(default_factory=Counter)
    """reason -> noun phrases of this caption that got no span."""


class CaptionTokenizer:
    """The backbone's CLIP BPE tokenizer, with character offsets for noun-phrase spans."""

    def __init__(self, backbone: str, np_length: int, context_length: int = CONTEXT_LENGTH) -> None:
        """
        Args:
            backbone: open_clip model name; its tokenizer must be CLIP's BPE `SimpleTokenizer`.
            np_length: length of the isolated noun-phrase rows, start and end tokens included.
            context_length: caption length (77 for every CLIP backbone).
        """
        self.tokenizer = tokenizer(backbone)
        if not isinstance(self.tokenizer, open_clip.SimpleTokenizer) or self.tokenizer.reduction_fn is not None:
            raise ValueError(
                f"backbone {backbone!r} uses {type(self.tokenizer).__name__}; noun-phrase spans need CLIP's BPE "
                "SimpleTokenizer with plain truncation"
            )
        self.np_length = np_length
        self.context_length = context_length
        self.sot = self.tokenizer.sot_token_id
        self.eot = self.tokenizer.eot_token_id

    def encode(self, text: str) -> list[int]:
        """BPE ids of `text` without start and end tokens (the tokenizer's own encoding)."""
        return self.tokenizer.encode(text)

    def caption_ids(self, caption: str) -> np.ndarray:
        """The tokenizer's own (77,) ids of the caption."""
        return self.tokenizer([caption], context_length=self.context_length)[0].numpy().astype(np.int32)

    def word_pieces(self, caption: str) -> list[WordPiece]:
        """The caption's regex words with their original character ranges and BPE ids, in order.

        The cleaned text is aligned to the original with a character diff, because cleaning may collapse
        whitespace, change case or repair characters (ftfy) and so shift positions.
        """
        tok = self.tokenizer
        cleaned = tok.clean_fn(caption)
        to_original = _character_map(caption, cleaned)
        pieces = []
        for match in regex.finditer(tok.pat, cleaned):
            word = "".join(tok.byte_encoder[byte] for byte in match.group().encode("utf-8"))
            ids = tuple(tok.encoder[piece] for piece in tok.bpe(word).split(" "))
            start = to_original[match.start()]
            end = to_original[match.end() - 1] + 1
            pieces.append(WordPiece(start, end, ids))
        return pieces

    def tokenize(self, caption: str, noun_phrases: Sequence[NounPhrase]) -> CaptionTokens:
        """Caption ids, and for each noun phrase its span in them and its own ids; NPs that cannot be kept are counted.

        An NP is dropped when its characters cut through a word (`misaligned`), when truncation at the context
        length cuts it (`truncated`: the span would reach past position 75), when it has more than np_length - 2
        tokens (`too_long`), or when its tokens alone differ from the caption's tokens in its span (`np_mismatch`).
        """
        caption_ids, located = self.locate(caption, noun_phrases)
        dropped = Counter(outcome for outcome in located if isinstance(outcome, str))
        kept = [(phrase, *outcome) for phrase, outcome in zip(noun_phrases, located) if not isinstance(outcome, str)]
        return self._result(caption_ids, kept, dropped)

    def locate(
        self, caption: str, noun_phrases: Sequence[NounPhrase]
    ) -> tuple[np.ndarray, list[tuple[int, int, list[int]] | str]]:
        """The caption's ids, and per noun phrase either (start, end, its own ids) or why it gets no span.

        The caption is tokenized once for all its phrases (see `tokenize` for the reasons).
        """
        caption_ids = self.caption_ids(caption)
        pieces = self.word_pieces(caption)
        replay = [self.sot, *(token for piece in pieces for token in piece.ids), self.eot]
        if len(replay) > self.context_length:
            replay = [*replay[: self.context_length - 1], self.eot]
        replay += [0] * (self.context_length - len(replay))
        if replay != caption_ids.tolist():
            return caption_ids, [TOKENIZER_MISMATCH] * len(noun_phrases)
        # Token position of every word: the start token sits at 0.
        positions = np.cumsum([1] + [len(piece.ids) for piece in pieces])
        last_content = self.context_length - 2  # position 76 holds the end token after truncation
        located: list[tuple[int, int, list[int]] | str] = []
        for phrase in noun_phrases:
            inside = [i for i, piece in enumerate(pieces) if piece.start >= phrase.start and piece.end <= phrase.end]
            overlapping = [i for i, piece in enumerate(pieces) if piece.start < phrase.end and piece.end > phrase.start]
            if not inside or inside != overlapping:
                located.append(MISALIGNED)
                continue
            start, end = int(positions[inside[0]]), int(positions[inside[-1] + 1])
            if end - 1 > last_content:
                located.append(TRUNCATED)
                continue
            alone = self.encode(phrase.text)
            if len(alone) > self.np_length - 2:
                located.append(TOO_LONG)
            elif alone != caption_ids[start:end].tolist():
                located.append(MISMATCH)
            else:
                located.append((start, end, alone))
        return caption_ids, located

    def _result(self, caption_ids: np.ndarray, kept: list, dropped: Counter) -> CaptionTokens:
        spans = np.zeros((len(kept), 2), dtype=np.int32)
        np_ids = np.zeros((len(kept), self.np_length), dtype=np.int32)
        for row, (_, start, end, alone) in enumerate(kept):
            spans[row] = (start, end)
            np_ids[row, : len(alone) + 2] = [self.sot, *alone, self.eot]
        return CaptionTokens(caption_ids, spans, np_ids, [phrase.text for phrase, *_ in kept], dropped)


def _character_map(original: str, cleaned: str) -> list[int]:
    """For every character of `cleaned`, the index of the `original` character it came from."""
    mapping = [0] * len(cleaned)
    lowered = original.lower()
    # A few characters change length when lower-cased; then compare as written, so indices stay the original's.
    reference = lowered if len(lowered) == len(original) else original
    matcher = difflib.SequenceMatcher(None, reference, cleaned, autojunk=False)
    for _, i1, i2, j1, j2 in matcher.get_opcodes():
        for j in range(j1, j2):
            # Equal and same-length blocks map one to one; other blocks map onto their original range.
            mapping[j] = min(i1 + (j - j1), max(i1, i2 - 1)) if i2 > i1 else max(0, i1 - 1)
    return mapping
