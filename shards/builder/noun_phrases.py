"""Noun phrases of modification captions from constituency trees: every NP in breadth-first order, or only the
innermost NPs left to right (`data.noun_phrases.selection`).

Two ways to get the trees: stanza's constituency parser (`tokenize,pos,constituency`, batched, GPU when present),
or PTB bracket strings from a JSONL sidecar (`{"caption", "tree"}`) read with stanza's own tree reader. Either way
every tree leaf gets the character offsets of its word in the caption, so a noun phrase is a character range
`[start, end)` of the caption and repeated words stay distinguishable downstream.
"""

from __future__ import annotations

import json
import logging
import string
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from shards.config import NP_SELECTIONS, NounPhraseConfig

logger = logging.getLogger(__name__)

NP_LABEL = "NP"
_EDGE_CHARACTERS = string.punctuation + string.whitespace
# stanza's reader already turns -LRB-/-RRB- into brackets; these are the other PTB escapes a sidecar may use.
_PTB_ESCAPES = {
    "-LRB-": ("(",),
    "-RRB-": (")",),
    "-LSB-": ("[",),
    "-RSB-": ("]",),
    "-LCB-": ("{",),
    "-RCB-": ("}",),
    "``": ('"', "``"),
    "''": ('"', "''"),
}
STANZA_PROCESSORS = "tokenize,pos,constituency"
# Loaded pipelines by (model directory, use_gpu): every source of a build shares one.
_PIPELINES: dict[tuple[str, bool], object] = {}


class NounPhraseError(RuntimeError):
    """Noun phrases cannot be extracted at all (models or tree sidecar missing); the message says how to fix it."""


@dataclass(frozen=True)
class NounPhrase:
    """A noun phrase as a character range of its caption."""

    text: str
    start: int
    end: int


@dataclass
class Extraction:
    """Noun phrases of a set of captions, and why the others have none."""

    noun_phrases: dict[str, list[NounPhrase]]
    """caption -> its noun phrases (possibly empty) for every caption that was parsed."""
    skipped: dict[str, str]
    """caption -> reason (`no_tree`, `tree_mismatch`, `parse_mismatch`) for captions that were not."""


def _normalised(text: str) -> str:
    return " ".join(text.lower().split())


def _core(text: str) -> str:
    """Text without surrounding punctuation and case: "A red cube." and "a red cube" are the same caption."""
    return _normalised(text.strip(_EDGE_CHARACTERS))


def _leaf_ranges(root) -> tuple[dict[int, tuple[int, int]], int]:
    """First and last leaf number of every node (by id()), numbering leaves left to right from 0."""
    ranges: dict[int, tuple[int, int]] = {}
    counter = 0
    # Iterative post-order, so a deep tree cannot hit Python's recursion limit.
    stack = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if node.is_leaf():
            ranges[id(node)] = (counter, counter)
            counter += 1
        elif expanded:
            ranges[id(node)] = (ranges[id(node.children[0])][0], ranges[id(node.children[-1])][1])
        else:
            stack.append((node, True))
            stack.extend((child, False) for child in reversed(node.children))
    return ranges, counter


def _is_noun_phrase(label: str | None) -> bool:
    # Function tags (NP-SBJ, NP-TMP) and indices (NP=2) still mark a noun phrase.
    return bool(label) and (label == NP_LABEL or label.startswith((NP_LABEL + "-", NP_LABEL + "=")))


def _breadth_first(trees: Sequence, first_leaf: dict[int, int]) -> Iterator[tuple[object, int]]:
    """(NP node, number of its tree's first leaf) of every tree, walked together level by level."""
    queue = deque((tree, first_leaf[id(tree)]) for tree in trees)
    while queue:
        node, base = queue.popleft()
        if node.is_leaf():
            continue
        if _is_noun_phrase(node.label):
            yield node, base
        queue.extend((child, base) for child in node.children)


def _innermost(trees: Sequence, first_leaf: dict[int, int]) -> Iterator[tuple[object, int]]:
    """(NP node, number of its tree's first leaf) of the NPs that contain no other NP, left to right."""
    for tree in trees:
        has_np: dict[int, bool] = {}  # node -> an NP at or below it
        # Iterative post-order (deep trees cannot hit the recursion limit). Innermost NPs never nest, so the order
        # in which post-order finishes them is their left-to-right order.
        stack = [(tree, False)]
        while stack:
            node, expanded = stack.pop()
            if node.is_leaf():
                has_np[id(node)] = False
            elif expanded:
                below = any(has_np[id(child)] for child in node.children)
                is_np = _is_noun_phrase(node.label)
                if is_np and not below:
                    yield node, first_leaf[id(tree)]
                has_np[id(node)] = is_np or below
            else:
                stack.append((node, True))
                stack.extend((child, False) for child in reversed(node.children))


def select_noun_phrases(
    trees: Sequence, leaf_offsets: Sequence[tuple[int, int]], caption: str, max_nps: int, selection: str = "bfs"
) -> list[NounPhrase]:
    """NP constituents of `trees` (the sentences of one caption), per `selection`.

    `bfs`: every NP, the trees walked together level by level, so a branch-level NP of any sentence comes before
    a leaf-level one. `leaf`: only the NPs that contain no other NP, left to right through the sentences. Either
    way an NP equal to the whole caption (ignoring case and surrounding punctuation), an NP without a letter or
    digit, and a repeat of an earlier NP's text (case-insensitive: it would have the same isolated tokens) are
    dropped, and at most `max_nps` are kept.

    Args:
        trees: stanza `Tree`s whose leaves, in order, are the words that `leaf_offsets` locate.
        leaf_offsets: `[start, end)` character range in `caption` of every leaf of every tree, in order.
        caption: the caption the offsets index.
        max_nps: how many noun phrases to keep.
        selection: `bfs` or `leaf` (`data.noun_phrases.selection`).
    """
    if selection not in NP_SELECTIONS:
        raise ValueError(f"data.noun_phrases.selection={selection!r} must be one of {NP_SELECTIONS}")
    ranges: dict[int, tuple[int, int]] = {}
    first_leaf: dict[int, int] = {}
    total = 0
    for tree in trees:
        tree_ranges, count = _leaf_ranges(tree)
        ranges.update(tree_ranges)
        first_leaf[id(tree)] = total
        total += count
    if total != len(leaf_offsets):
        raise ValueError(f"{total} tree leaves but {len(leaf_offsets)} leaf offsets for caption {caption!r}")
    whole = _core(caption)
    found: list[NounPhrase] = []
    seen: set[str] = set()
    candidates = _innermost(trees, first_leaf) if selection == "leaf" else _breadth_first(trees, first_leaf)
    for node, base in candidates:
        if len(found) >= max_nps:
            break
        first, last = ranges[id(node)]
        start, end = leaf_offsets[base + first][0], leaf_offsets[base + last][1]
        text = caption[start:end]
        key = _normalised(text)
        if key not in seen and _core(text) != whole and any(char.isalnum() for char in text):
            seen.add(key)
            found.append(NounPhrase(text, start, end))
    return found


def align_leaves(caption: str, leaves: Sequence[str]) -> list[tuple[int, int]] | None:
    """Character range of every leaf in `caption`, matching leaves left to right; None when they do not match.

    Whitespace between leaves is skipped; PTB escapes (-LRB-, ``, ...) match the characters they stand for.
    """
    offsets = []
    cursor = 0
    for leaf in leaves:
        while cursor < len(caption) and caption[cursor].isspace():
            cursor += 1
        for candidate in (leaf, *_PTB_ESCAPES.get(leaf, ())):
            if candidate and caption.startswith(candidate, cursor):
                offsets.append((cursor, cursor + len(candidate)))
                cursor += len(candidate)
                break
        else:
            return None
    return offsets


def read_tree_sidecar(path: str | Path) -> dict[str, str]:
    """caption -> PTB bracket tree from a `{"caption", "tree"}` JSONL file (the first tree of a caption wins).

    Raises:
        NounPhraseError: the file is missing or a line is malformed (file and line named).
    """
    path = Path(path)
    if not path.is_file():
        raise NounPhraseError(
            f"tree sidecar not found: {path} (data.noun_phrases.parser=trees reads each source's `trees` file)"
        )
    trees: dict[str, str] = {}
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                caption, tree = entry["caption"], entry["tree"]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise NounPhraseError(f'{path} line {number}: expected {{"caption", "tree"}} ({error})') from error
            trees.setdefault(str(caption), str(tree))
    return trees


def extract_from_trees(
    captions: Iterable[str], trees_by_caption: dict[str, str], max_nps: int, selection: str = "bfs"
) -> Extraction:
    """Noun phrases of `captions` from given PTB bracket trees, parsed by stanza's tree reader (see
    `select_noun_phrases` for `max_nps` and `selection`)."""
    from stanza.models.constituency.tree_reader import read_trees

    result = Extraction({}, {})
    for caption in captions:
        bracket = trees_by_caption.get(caption)
        if bracket is None:
            result.skipped[caption] = "no_tree"
            continue
        try:
            trees = read_trees(bracket, use_tqdm=False)
        except Exception as error:  # stanza raises ValueError and its own errors on broken brackets
            logger.warning("unreadable tree for caption %r: %s", caption, error)
            result.skipped[caption] = "tree_unreadable"
            continue
        leaves = [leaf for tree in trees for leaf in tree.leaf_labels()]
        offsets = align_leaves(caption, leaves)
        if offsets is None or not trees:
            result.skipped[caption] = "tree_mismatch"
            continue
        result.noun_phrases[caption] = select_noun_phrases(trees, offsets, caption, max_nps, selection)
    return result


def stanza_model_dir(config: NounPhraseConfig) -> Path:
    """Where stanza's models are looked up: `stanza_dir`, else `$STANZA_RESOURCES_DIR` or stanza's default."""
    if config.stanza_dir:
        return Path(config.stanza_dir)
    from stanza.resources.common import DEFAULT_MODEL_DIR

    return Path(DEFAULT_MODEL_DIR)


def _missing_models_message(directory: Path, detail: str) -> str:
    return (
        f"stanza's English models ({STANZA_PROCESSORS}) are not in {directory} ({detail}). Get them on a machine "
        f"with internet: python -c \"import stanza; stanza.download('en', processors='{STANZA_PROCESSORS}', "
        f"model_dir='{directory}')\" and copy that directory here, or point data.noun_phrases.stanza_dir at a "
        "copy; or use data.noun_phrases.parser=trees with a tree sidecar per source."
    )


def load_stanza_pipeline(config: NounPhraseConfig):
    """stanza's English constituency pipeline from local models only (never downloads).

    Raises:
        NounPhraseError: the models are not in `stanza_model_dir(config)`; the message says how to get them.
    """
    import stanza
    import torch

    directory = stanza_model_dir(config)
    use_gpu = bool(config.use_gpu and torch.cuda.is_available())
    if (str(directory), use_gpu) in _PIPELINES:
        return _PIPELINES[str(directory), use_gpu]
    if not (directory / "resources.json").is_file():
        raise NounPhraseError(_missing_models_message(directory, "no resources.json"))
    if not (directory / "en").is_dir():
        raise NounPhraseError(_missing_models_message(directory, "no en/ directory"))
    try:
        pipeline = stanza.Pipeline(
            lang="en",
            processors=STANZA_PROCESSORS,
            dir=str(directory),
            use_gpu=use_gpu,
            download_method=None,
            logging_level="WARN",
        )
    except Exception as error:  # stanza reports absent model files through several exception types
        raise NounPhraseError(_missing_models_message(directory, f"{type(error).__name__}: {error}")) from error
    _PIPELINES[str(directory), use_gpu] = pipeline
    return pipeline


def _word_offsets(sentence) -> list[tuple[int, int]] | None:
    offsets = []
    for word in sentence.words:
        start, end = word.start_char, word.end_char
        if start is None or end is None:
            # A word inside a multi-word token may lack offsets; its token's range is the closest truth.
            start, end = word.parent.start_char, word.parent.end_char
        if start is None or end is None:
            return None
        offsets.append((start, end))
    return offsets


def noun_phrases_of_document(document, caption: str, max_nps: int, selection: str = "bfs") -> list[NounPhrase] | None:
    """Noun phrases of one stanza-parsed caption (`select_noun_phrases`); None when its trees and words do not
    line up."""
    trees = [sentence.constituency for sentence in document.sentences]
    offsets: list[tuple[int, int]] = []
    for sentence in document.sentences:
        sentence_offsets = _word_offsets(sentence)
        if sentence_offsets is None or sentence.constituency is None:
            return None
        offsets.extend(sentence_offsets)
    if sum(len(tree.leaf_labels()) for tree in trees) != len(offsets):
        return None
    return select_noun_phrases(trees, offsets, caption, max_nps, selection)


def extract_with_stanza(captions: Sequence[str], config: NounPhraseConfig, pipeline=None) -> Extraction:
    """Noun phrases of `captions` parsed by stanza in batches of `config.batch_size` (one Document per caption).

    Args:
        captions: the captions, each parsed once.
        config: parser settings.
        pipeline: an already loaded stanza pipeline; loaded from local models when None.
    """
    pipeline = pipeline if pipeline is not None else load_stanza_pipeline(config)
    result = Extraction({}, {})
    unique = list(dict.fromkeys(captions))
    batches = range(0, len(unique), config.batch_size)
    for begin in tqdm(batches, desc="stanza parse", unit="batch", disable=len(batches) < 2):
        batch = unique[begin : begin + config.batch_size]
        # bulk_process keeps one Document per caption, so character offsets stay relative to each caption.
        documents = pipeline.bulk_process(batch)
        for caption, document in zip(batch, documents, strict=True):
            phrases = noun_phrases_of_document(document, caption, config.max_nps, config.selection)
            if phrases is None:
                result.skipped[caption] = "parse_mismatch"
            else:
                result.noun_phrases[caption] = phrases
    return result
