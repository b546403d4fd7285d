"""Caption ids, NP token spans from character offsets (repeated words, truncation at 77), isolated NP ids."""

from __future__ import annotations

import pytest

from shards.builder.noun_phrases import NounPhrase
from shards.builder.tokens import MISALIGNED, TOO_LONG, TRUNCATED, CaptionTokenizer
from shards.model_inputs import TINY_BACKBONE, tokenizer


@pytest.fixture(scope="module")
def caption_tokenizer() -> CaptionTokenizer:
    return CaptionTokenizer(TINY_BACKBONE, np_length=16)


def _phrase(caption: str, text: str, occurrence: int = 0) -> NounPhrase:
    start = -1
    for _ in range(occurrence + 1):
        start = caption.index(text, start + 1)
    return NounPhrase(text, start, start + len(text))


def test_repeated_words_map_to_the_right_occurrence(caption_tokenizer):
    caption = "the red cube left of the red cube"
    first, second = _phrase(caption, "the red cube"), _phrase(caption, "red cube", occurrence=1)
    tokens = caption_tokenizer.tokenize(caption, [first, second])
    clip = tokenizer(TINY_BACKBONE)
    assert tokens.caption_ids.tolist() == clip([caption])[0].tolist()
    # <sot> the red cube left of the red cube <eot>: the second "red cube" is at 7..9, not at 2..4.
    assert tokens.np_spans.tolist() == [[1, 4], [7, 9]]
    assert tokens.noun_phrases == ["the red cube", "red cube"]
    for row, (start, end) in enumerate(tokens.np_spans.tolist()):
        alone = clip([tokens.noun_phrases[row]], context_length=16)[0].tolist()
        assert tokens.np_ids[row].tolist() == alone
        assert alone[1 : 1 + end - start] == tokens.caption_ids[start:end].tolist()


def test_offsets_survive_cleaning(caption_tokenizer):
    """Case, runs of spaces, HTML entities and curly quotes change the text the BPE sees, not the spans."""
    caption = "Make  THE dog’s ball &amp; the ball  blue"
    phrases = [_phrase(caption, "THE dog’s ball"), _phrase(caption, "the ball")]
    tokens = caption_tokenizer.tokenize(caption, phrases)
    assert not tokens.dropped
    ids = tokens.caption_ids.tolist()
    clip = tokenizer(TINY_BACKBONE)
    (first_start, first_end), (second_start, second_end) = tokens.np_spans.tolist()
    assert ids[first_start:first_end] == clip.encode("the dog's ball")
    assert ids[second_start:second_end] == clip.encode("the ball")
    # <sot> make the dog 's ball & the ball blue <eot>
    assert tokens.np_spans.tolist() == [[2, 6], [7, 9]]


def test_phrase_cutting_through_a_word_is_dropped(caption_tokenizer):
    caption = "replace the bluebird with a cat"
    tokens = caption_tokenizer.tokenize(caption, [NounPhrase("the blue", 8, 16), _phrase(caption, "a cat")])
    assert tokens.noun_phrases == ["a cat"]
    assert tokens.dropped == {MISALIGNED: 1}


def test_phrase_longer_than_np_length_is_dropped():
    short = CaptionTokenizer(TINY_BACKBONE, np_length=4)
    caption = "put the big red cube near a cat"
    tokens = short.tokenize(caption, [_phrase(caption, "the big red cube"), _phrase(caption, "a cat")])
    assert tokens.noun_phrases == ["a cat"] and tokens.dropped == {TOO_LONG: 1}
    assert tokens.np_ids.shape == (1, 4) and tokens.np_ids[0, 3] == short.eot


def test_caption_longer_than_77_tokens_drops_spans_past_the_limit(caption_tokenizer):
    clip = tokenizer(TINY_BACKBONE)
    # Each "b" is one token: 73 of them put "red cube" at positions 74..75, the last before the forced end token.
    for filler, kept in ((73, True), (74, False)):
        caption = "a cat " + "b " * (filler - 2) + "red cube and a dog"
        phrases = [_phrase(caption, "a cat"), _phrase(caption, "red cube"), _phrase(caption, "a dog")]
        tokens = caption_tokenizer.tokenize(caption, phrases)
        assert len(clip.encode(caption)) > 77
        assert tokens.caption_ids.tolist() == clip([caption])[0].tolist()
        assert tokens.caption_ids[76] == caption_tokenizer.eot
        if kept:
            assert tokens.np_spans.tolist() == [[1, 3], [74, 76]]
            assert tokens.dropped == {TRUNCATED: 1}
        else:
            assert tokens.np_spans.tolist() == [[1, 3]]
            assert tokens.dropped == {TRUNCATED: 2}
        assert (tokens.np_spans[:, 1] <= 76).all()


def test_no_noun_phrases_gives_empty_arrays(caption_tokenizer):
    tokens = caption_tokenizer.tokenize("make it brighter", [])
    assert tokens.np_spans.shape == (0, 2) and tokens.np_ids.shape == (0, 16) and tokens.noun_phrases == []
