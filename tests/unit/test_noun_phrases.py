"""Noun phrases from constituency trees: BFS order, whole-caption and duplicate removal, max_nps, offsets."""

from __future__ import annotations

import json
import re

import pytest
from shard_fixtures import parse_captions
from stanza.models.common.doc import Document
from stanza.models.constituency.tree_reader import read_trees

from shards.builder.noun_phrases import (
    NounPhraseError,
    align_leaves,
    extract_from_trees,
    load_stanza_pipeline,
    noun_phrases_of_document,
    read_tree_sidecar,
)
from shards.config import NounPhraseConfig


def _texts(caption: str, tree: str, max_nps: int = 10) -> list[str]:
    result = extract_from_trees([caption], {caption: tree}, max_nps)
    assert caption not in result.skipped, result.skipped
    return [phrase.text for phrase in result.noun_phrases[caption]]


def test_breadth_first_puts_branch_level_before_leaf_level():
    caption = "the cube with a hat is a ball"
    tree = (
        "(ROOT (S (NP (NP (DT the) (NN cube)) (PP (IN with) (NP (DT a) (NN hat)))) "
        "(VP (VBZ is) (NP (DT a) (NN ball)))))"
    )
    # Depth-first would give "a hat" before "a ball"; breadth-first finishes a level first.
    assert _texts(caption, tree) == ["the cube with a hat", "the cube", "a ball", "a hat"]


def test_whole_caption_noun_phrase_is_dropped():
    caption = "A dog with a hat."
    tree = "(ROOT (NP (NP (DT A) (NN dog)) (PP (IN with) (NP (DT a) (NN hat))) (. .)))"
    assert _texts(caption, tree) == ["A dog", "a hat"]
    # Also when the top NP leaves out the final full stop.
    tree = "(ROOT (FRAG (NP (NP (DT A) (NN dog)) (PP (IN with) (NP (DT a) (NN hat)))) (. .)))"
    assert _texts(caption, tree) == ["A dog", "a hat"]


def test_duplicates_are_dropped_and_offsets_point_at_each_occurrence():
    caption = "put the cube left of The cube and a cube"
    tree = (
        "(ROOT (S (VP (VB put) (NP (DT the) (NN cube)) (ADVP (RB left) (PP (IN of) "
        "(NP (NP (DT The) (NN cube)) (CC and) (NP (DT a) (NN cube))))))))"
    )
    result = extract_from_trees([caption], {caption: tree}, 10).noun_phrases[caption]
    assert [(p.text, p.start, p.end) for p in result] == [
        ("the cube", 4, 12),
        ("The cube and a cube", 21, 40),
        ("a cube", 34, 40),
    ]
    assert all(caption[p.start : p.end] == p.text for p in result)


def test_at_most_max_nps_in_breadth_first_order():
    nouns = [f"thing{i}" for i in range(12)]
    caption = "put " + " and ".join(f"the {noun}" for noun in nouns)
    conjuncts = " (CC and) ".join(f"(NP (DT the) (NN {noun}))" for noun in nouns)
    tree = f"(ROOT (S (VP (VB put) (NP {conjuncts}))))"
    texts = _texts(caption, tree)
    assert len(texts) == 10
    assert texts[0] == caption[4:]  # the coordination NP is one level above its conjuncts
    assert texts[1:] == [f"the {noun}" for noun in nouns[:9]]
    assert len(_texts(caption, tree, max_nps=3)) == 3


def test_leaf_alignment_handles_ptb_escapes_and_spacing():
    caption = 'the  (red) ball "here"'
    leaves = ["the", "-LRB-", "red", "-RRB-", "ball", "``", "here", "''"]
    assert align_leaves(caption, leaves) == [(0, 3), (5, 6), (6, 9), (9, 10), (11, 15), (16, 17), (17, 21), (21, 22)]
    assert align_leaves(caption, ["the", "blue"]) is None


def test_trees_mode_skips_captions_without_a_matching_tree(tmp_path):
    sidecar = tmp_path / "trees.jsonl"
    lines = [
        {"caption": "make the (small) cube red", "tree": "(ROOT (S (VP (VB make) (S (NP (DT the) (-LRB- -LRB-) "
         "(JJ small) (-RRB- -RRB-) (NN cube)) (ADJP (JJ red))))))"},
        {"caption": "remove the ball", "tree": "(ROOT (S (VP (VB remove) (NP (DT a) (NN ball)))))"},
        {"caption": "broken", "tree": "(ROOT (NP (NN broken)"},
    ]  # fmt: skip
    sidecar.write_text("".join(json.dumps(line) + "\n" for line in lines))
    config = NounPhraseConfig(parser="trees")
    captions = ["make the (small) cube red", "remove the ball", "no tree for me", "broken"]
    result = parse_captions(captions, config, str(sidecar))
    assert [p.text for p in result.noun_phrases["make the (small) cube red"]] == ["the (small) cube"]
    assert result.skipped == {
        "remove the ball": "tree_mismatch",
        "no tree for me": "no_tree",
        "broken": "tree_unreadable",
    }


def test_trees_mode_errors_name_the_sidecar(tmp_path):
    with pytest.raises(NounPhraseError, match="missing.jsonl"):
        parse_captions(["a cube"], NounPhraseConfig(parser="trees"), str(tmp_path / "missing.jsonl"))
    with pytest.raises(NounPhraseError, match="trees"):
        parse_captions(["a cube"], NounPhraseConfig(parser="trees"), None)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"caption": "a", "tree": "(NP a)"}\n{"caption": "b"}\n')
    with pytest.raises(NounPhraseError, match=r"bad\.jsonl line 2"):
        read_tree_sidecar(bad)


def test_stanza_without_models_is_one_clear_error(tmp_path):
    config = NounPhraseConfig(parser="stanza", stanza_dir=str(tmp_path))
    with pytest.raises(NounPhraseError) as error:
        parse_captions(["replace the cube with a ball"], config, None)
    message = str(error.value)
    assert str(tmp_path) in message and "stanza.download('en'" in message and "stanza_dir" in message
    # A directory with a resources index but no English models is refused the same way, without any download.
    (tmp_path / "resources.json").write_text("{}")
    with pytest.raises(NounPhraseError, match=re.escape(str(tmp_path))):
        load_stanza_pipeline(config)


def test_stanza_documents_give_character_offsets_from_words():
    """The stanza path on a Document as the pipeline returns it: words with offsets, one tree per sentence."""
    caption = "put the cube  next to a ball. It is red."
    sentences, words = [], []
    for match in re.finditer(r"\w+|[^\w\s]", caption):
        words.append(
            {"id": len(words) + 1, "text": match.group(), "start_char": match.start(), "end_char": match.end()}
        )
        if match.group() == ".":
            sentences.append(words)
            words = []
    document = Document(sentences, text=caption)
    trees = read_trees(
        "(ROOT (S (VP (VB put) (NP (DT the) (NN cube)) (ADVP (RB next) (PP (TO to) (NP (DT a) (NN ball))))) (. .)))"
        "(ROOT (S (NP (PRP It)) (VP (VBZ is) (ADJP (JJ red))) (. .)))",
        use_tqdm=False,
    )
    for sentence, tree in zip(document.sentences, trees, strict=True):
        sentence.constituency = tree
    phrases = noun_phrases_of_document(document, caption, 10)
    # Both sentences are walked together: the second sentence's shallow NP precedes the first's deeper ones.
    assert [(p.text, p.start, p.end) for p in phrases] == [("It", 30, 32), ("the cube", 4, 12), ("a ball", 22, 28)]
