"""Which noun phrases are used (`data.noun_phrases.selection`): every NP breadth-first, or the innermost NPs only,
left to right; `max_nps` caps both; a change of selection re-extracts the phrases and rebuilds the shards."""

from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path

import pytest
from raw_dataset_fixtures import write_cirr
from shard_fixtures import parse_captions
from stanza.models.common.doc import Document
from stanza.models.constituency.tree_reader import read_trees

from shards.builder.noun_phrases import extract_from_trees, noun_phrases_of_document
from shards.builder.shard_set import build_shards
from shards.config import DataConfig, NounPhraseConfig, SourceConfig
from shards.format import split_member_name
from shards.model_inputs import TINY_BACKBONE

NESTED_CAPTION = "the cube with a hat is a ball"
NESTED_TREE = (
    "(ROOT (S (NP (NP (DT the) (NN cube)) (PP (IN with) (NP (DT a) (NN hat)))) (VP (VBZ is) (NP (DT a) (NN ball)))))"
)


def _texts(caption: str, tree: str, selection: str, max_nps: int = 10) -> list[str]:
    result = extract_from_trees([caption], {caption: tree}, max_nps, selection)
    assert caption not in result.skipped, result.skipped
    return [phrase.text for phrase in result.noun_phrases[caption]]


def test_leaf_selection_keeps_only_innermost_noun_phrases_left_to_right():
    # BFS (the default) has the branch-level NP first and the deeper "a hat" after the shallower "a ball".
    assert _texts(NESTED_CAPTION, NESTED_TREE, "bfs") == ["the cube with a hat", "the cube", "a ball", "a hat"]
    assert _texts(NESTED_CAPTION, NESTED_TREE, "leaf") == ["the cube", "a hat", "a ball"]


def test_max_nps_caps_both_selections():
    assert _texts(NESTED_CAPTION, NESTED_TREE, "bfs", max_nps=2) == ["the cube with a hat", "the cube"]
    assert _texts(NESTED_CAPTION, NESTED_TREE, "leaf", max_nps=2) == ["the cube", "a hat"]
    assert _texts(NESTED_CAPTION, NESTED_TREE, "leaf", max_nps=0) == []


def test_leaf_selection_in_deep_trees_and_with_the_usual_filters():
    caption = "put the lid of the red box on a box"
    tree = (
        "(ROOT (S (VP (VB put) (NP (NP (NP (DT the) (NN lid)) (PP (IN of) (NP (DT the) (JJ red) (NN box))))) "
        "(PP (IN on) (NP (DT a) (NN box))))))"
    )
    assert _texts(caption, tree, "leaf") == ["the lid", "the red box", "a box"]
    # An innermost NP spanning the whole caption is dropped like any other (and its parents stay non-leaf).
    assert _texts("A red cube.", "(ROOT (NP (DT A) (JJ red) (NN cube) (. .)))", "leaf") == []
    # Repeated texts are dropped (case-insensitively), keeping the first occurrence's offsets.
    caption = "put the cube on The cube"
    tree = "(ROOT (S (VP (VB put) (NP (DT the) (NN cube)) (PP (IN on) (NP (DT The) (NN cube))))))"
    result = extract_from_trees([caption], {caption: tree}, 10, "leaf").noun_phrases[caption]
    assert [(p.text, p.start, p.end) for p in result] == [("the cube", 4, 12)]


def test_stanza_documents_and_the_trees_sidecar_use_the_configured_selection(tmp_path):
    caption = "put the cube with a hat next to a ball. It is red."
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
        "(ROOT (S (VP (VB put) (NP (NP (DT the) (NN cube)) (PP (IN with) (NP (DT a) (NN hat)))) (ADVP (RB next) "
        "(PP (TO to) (NP (DT a) (NN ball))))) (. .)))"
        "(ROOT (S (NP (PRP It)) (VP (VBZ is) (ADJP (JJ red))) (. .)))",
        use_tqdm=False,
    )
    for sentence, tree in zip(document.sentences, trees, strict=True):
        sentence.constituency = tree
    leaf = noun_phrases_of_document(document, caption, 10, "leaf")
    # Sentence by sentence, left to right within each.
    assert [p.text for p in leaf] == ["the cube", "a hat", "a ball", "It"]
    bfs = noun_phrases_of_document(document, caption, 10)
    assert [p.text for p in bfs] == ["It", "the cube with a hat", "the cube", "a hat", "a ball"]

    sidecar = tmp_path / "trees.jsonl"
    sidecar.write_text(json.dumps({"caption": NESTED_CAPTION, "tree": NESTED_TREE}) + "\n")
    config = NounPhraseConfig(parser="trees", selection="leaf", max_nps=2)
    result = parse_captions([NESTED_CAPTION], config, str(sidecar))
    assert [p.text for p in result.noun_phrases[NESTED_CAPTION]] == ["the cube", "a hat"]


def test_selection_is_validated():
    with pytest.raises(ValueError, match="data.noun_phrases.selection"):
        NounPhraseConfig(selection="dfs")
    assert NounPhraseConfig().selection == "bfs"


def _nested_cirr(root: Path, count: int) -> None:
    """The CIRR fixture with trees whose first NP nests the second (so BFS and leaf selection differ)."""
    entries = write_cirr(root, count)
    lines = []
    for entry in entries:
        words = entry["caption"].split()  # replace the <c> <s> with a <c'> <s'>
        tree = (
            f"(ROOT (S (VP (VB replace) (NP (NP (DT the) (JJ {words[2]}) (NN {words[3]})) "
            f"(PP (IN with) (NP (DT a) (JJ {words[6]}) (NN {words[7]})))))))"
        )
        lines.append(json.dumps({"caption": entry["caption"], "tree": tree}))
    (root / "trees.jsonl").write_text("\n".join(lines) + "\n")


def _phrases(shards_dir: Path) -> dict[str, list[str]]:
    phrases = {}
    for path in sorted(shards_dir.glob("shard-*.tar")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, field = split_member_name(member.name)
                if field == "json":
                    phrases[key] = json.loads(tar.extractfile(member).read())["noun_phrases"]
    return phrases


def test_changing_the_selection_rebuilds_the_shards(tmp_path):
    root, shards = tmp_path / "cirr", tmp_path / "shards"
    _nested_cirr(root, 6)

    def build(selection: str):
        data = DataConfig(
            sources=[SourceConfig(name="cirr", kind="cirr", path=str(root), trees=str(root / "trees.jsonl"))],
            shards_dir=str(shards),
            samples_per_shard=3,
            image_short_side=12,
            build_workers=1,
            noun_phrases=NounPhraseConfig(parser="trees", selection=selection),
        )
        return build_shards(data, TINY_BACKBONE, progress=False)

    assert build("bfs").rebuilt == 2
    breadth_first = _phrases(shards)
    assert all(len(texts) == 3 and " with " in texts[0] for texts in breadth_first.values())
    assert build("bfs").rebuilt == 0  # nothing changed: nothing rebuilt
    assert build("leaf").rebuilt == 2  # the NP cache and every shard follow the new selection
    leaf = _phrases(shards)
    assert leaf.keys() == breadth_first.keys()
    assert all(leaf[key] == breadth_first[key][1:] for key in leaf)  # the two inner NPs, left to right
    index = json.loads((shards / "index.json").read_text())
    assert index["noun_phrases"]["selection"] == "leaf"
    # The cache of the old selection is gone; the new one's chunks hold the inner NPs only.
    (folder,) = (shards / "noun_phrases").iterdir()
    chunks = [json.loads(path.read_text()) for path in folder.glob("chunk-*.json")]
    cached = [phrase[0] for chunk in chunks for phrases in chunk["noun_phrases"].values() for phrase in phrases]
    assert cached and not any(" with " in text for text in cached)
