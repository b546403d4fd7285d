"""Token spans of a query's grounded noun phrases and their ids alone, from the shard builder's tokenization.

The eval job must find each noun phrase's tokens exactly as training did, so it reuses `shards.builder.tokens`
(character offsets, not the first matching token subsequence; each phrase's own BPE ids, checked against the
caption's) instead of a second implementation.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

from shards.builder.noun_phrases import NounPhrase
from shards.builder.tokens import CaptionTokenizer
from shards.model_inputs import CONTEXT_LENGTH
from training.evaluation.benchmarks.base import GroundedPhrase
from training.evaluation.encode import SpanFinder
from training.evaluation.phrase_maps import PhraseTokens


def locate(caption: str, text: str, resume: int = 0) -> int | None:
    """Character offset of `text` as whole words in `caption`, or None.

    Annotations without offsets list their phrases in caption order, so the first occurrence at or after the
    previous phrase's end is preferred; failing that, the first occurrence anywhere.
    """
    starts = [match.start() for match in re.finditer(rf"(?<!\w){re.escape(text)}(?!\w)", caption)]
    if not starts:
        return None
    return next((start for start in starts if start >= resume), starts[0])


def phrase_span_finder(backbone: str) -> SpanFinder:
    """A function (caption, phrases) -> each phrase's tokens, or None without a span.

    A phrase's tokens are its `[start, end)` in the caption ids and its ids encoded alone, the row the shard builder
    writes to `np_ids` (start token, the phrase's BPE ids, end token) for the isolated and tower maps. A phrase gets
    None when its text is not in the caption, when truncation at 77 tokens cuts it, or when its characters cut
    through a word; the runner counts those as dropped. `phrases` must be hashable (a tuple, as `Query.phrases` is):
    the results are cached, since a watcher scores the same benchmark at every checkpoint.
    """
    # Isolated rows are as long as each phrase needs, so training's `np_length` never decides which phrase is scored.
    tokenizer = CaptionTokenizer(backbone, np_length=CONTEXT_LENGTH)

    @functools.lru_cache(maxsize=1 << 20)  # a benchmark's spans are found once and reused for every checkpoint
    def find_spans(caption: str, phrases: Sequence[GroundedPhrase]) -> list[PhraseTokens | None]:
        found: list[NounPhrase | None] = []
        resume = 0
        for phrase in phrases:
            start = phrase.char_start if phrase.char_start is not None else locate(caption, phrase.text, resume)
            if start is None or caption[start : start + len(phrase.text)] != phrase.text:
                found.append(None)
                continue
            resume = start + len(phrase.text)
            found.append(NounPhrase(phrase.text, start, resume))
        located = iter(tokenizer.locate(caption, [phrase for phrase in found if phrase is not None])[1])
        spans: list[PhraseTokens | None] = []
        for phrase in found:  # the caption is tokenized once for all its phrases
            outcome = next(located) if phrase is not None else None
            if outcome is None or isinstance(outcome, str):
                spans.append(None)
                continue
            start, end, alone = outcome
            spans.append(PhraseTokens(start, end, (tokenizer.sot, *alone, tokenizer.eot)))
        return spans

    return find_spans
