"""CVSI's text side against the scene oracle (in-process, on 127.0.0.1): captions and edits of a small synthetic
benchmark, the cache that makes a rerun free, faults, a dead or refusing endpoint, and the CoCa captioner."""

from __future__ import annotations

import hashlib
import json
import logging
import socket
import threading
from contextlib import contextmanager
from pathlib import Path

import open_clip
import pytest
import torch

from shards.synthetic import generate
from shards.synthetic.oracle import SceneOracle, make_server
from shards.synthetic.oracle_cvsi import scene_captions
from training.model.towers import PretrainedWeightsUnavailable
from training.zeroshot.cvsi_config import CVSIConfig
from training.zeroshot.cvsi_texts import CVSIEndpointError, cvsi_texts

TINY_COCA = {
    "embed_dim": 32,
    "vision_cfg": {
        "image_size": 32,
        "layers": 1,
        "width": 32,
        "head_width": 16,
        "patch_size": 16,
        "attentional_pool": True,
        "attn_pooler_queries": 8,
        "attn_pooler_heads": 2,
        "output_tokens": True,
    },
    "text_cfg": {
        "context_length": 76,
        "vocab_size": 49408,
        "width": 32,
        "heads": 2,
        "layers": 1,
        "embed_cls": True,
        "output_tokens": True,
    },
    "multimodal_cfg": {
        "context_length": 76,
        "vocab_size": 49408,
        "width": 32,
        "heads": 2,
        "layers": 1,
        "attn_pooler_heads": 2,
        "dim_head": 16,
    },
    "custom_text": True,
}


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cvsi") / "synthetic"
    generate(root, seed=11, n_train=10, n_val=10, n_test=5)
    return root


def _split(root: Path, split: str) -> tuple[dict[str, Path], list[tuple[str, str, str]], dict[str, str]]:
    """(images, queries, query id -> target or "") of one split."""
    files = json.loads((root / "cirr" / "image_splits" / f"split.rc2.{split}.json").read_text())
    entries = json.loads((root / "cirr" / "captions" / f"cap.rc2.{split}.json").read_text())
    images = {name: root / relative for name, relative in sorted(files.items())}
    queries = [(f"{split}-{entry['pairid']}", entry["reference"], entry["caption"]) for entry in entries]
    targets = {f"{split}-{entry['pairid']}": entry.get("target_hard", "") for entry in entries}
    return images, queries, targets


@contextmanager
def _oracle(root: Path, fault_rate: float = 0.0):
    """The scene oracle served from a thread of this process; shut down even when the test fails."""
    oracle = SceneOracle.from_root(root, fault_rate=fault_rate, seed=3)
    server = make_server(oracle, 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", oracle
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _config(tmp_path: Path, endpoint: str, **overrides) -> CVSIConfig:
    settings = {"captioner_endpoint": endpoint, "editor_endpoint": endpoint, "backoff_s": 0.01, "timeout_s": 10.0}
    return CVSIConfig(cache_dir=str(tmp_path / "cache"), **{**settings, **overrides})


def _objects(root: Path) -> dict[str, dict]:
    return json.loads((root / "objects.json").read_text())["images"]


def test_captions_and_edits_come_from_the_scenes_and_a_rerun_asks_nothing(bench, tmp_path):
    images, queries, targets = _split(bench, "val")
    test_images, test_queries, _ = _split(bench, "test1")
    scenes = _objects(bench)
    reference = queries[0][1]
    queries += test_queries[:2] + [("odd", reference, "paint it purple"), ("lost", "no-such-image", "add a cat")]
    images.update(test_images)
    with _oracle(bench) as (endpoint, oracle):
        config = _config(tmp_path, endpoint)
        first = cvsi_texts(config, images, queries, progress=False)
        served = dict(oracle.counts)
        distinct = len({hashlib.sha256(path.read_bytes()).hexdigest() for path in images.values()})
        assert first.calls == served["ok"] == distinct + len(queries) - 1  # each image once, every edit but "lost"
        second = cvsi_texts(config, images, queries, progress=False)
        assert second.calls == 0 and dict(oracle.counts) == served  # the cache answered everything
    assert (second.captions, second.edits, second.failures) == (first.captions, first.edits, first.failures)

    for name in images:
        captions = first.captions[name]
        assert len(captions) == 3 == len(set(captions)) and captions[0] == scenes[name]["description"]
    for query_id, reference_name, _ in queries[:-4]:  # val: benchmark triplets with a target
        target = scenes[targets[query_id]]
        edit = first.edits[query_id]
        assert edit.captions == scene_captions(target, 3) != first.captions[reference_name]
        assert all(f"{obj['color']} {obj['shape']}" in edit.captions[0] for obj in target["objects"])
        had = {(obj["color"], obj["shape"]) for obj in scenes[reference_name]["objects"]}
        new = [f"{obj['color']} {obj['shape']}" for obj in target["objects"] if (obj["color"], obj["shape"]) not in had]
        assert sorted(edit.added) == sorted(new)
    assert any(first.edits[query_id].added for query_id, _, _ in queries[:-4])
    for query_id, reference_name, text in queries[-4:-1]:  # no triplet with a target: captions + ", then <text>"
        unchanged = first.captions[reference_name]
        assert first.edits[query_id].captions == [f"{caption}, then {text}" for caption in unchanged]
        assert first.edits[query_id].added == []
    assert first.edits["lost"].captions == [] and set(first.failures) == {"query lost"}


def test_faults_are_retried_and_repaired_and_an_item_that_still_fails_gets_its_stand_in(bench, tmp_path, caplog):
    images, queries, targets = _split(bench, "val")
    scenes = _objects(bench)
    items = len(images) + len(queries)
    with _oracle(bench, fault_rate=0.45) as (endpoint, oracle):
        repaired = cvsi_texts(_config(tmp_path / "repaired", endpoint), images, queries, progress=False)
        counts = dict(oracle.counts)
    assert counts["fault_429"] > 0 and counts["fault_malformed"] > 0
    assert repaired.calls > items and not repaired.failures  # retries and repair turns got every answer
    assert all(repaired.captions[name] == scene_captions(scenes[name], 3) for name in images)
    assert all(repaired.edits[q].captions == scene_captions(scenes[targets[q]], 3) for q, _, _ in queries)

    # No repair turn and more faults: some items fail, each gets its stand-in, and the run still ends.
    with _oracle(bench, fault_rate=0.9) as (endpoint, _), caplog.at_level(logging.WARNING):
        strict = _config(tmp_path / "strict", endpoint, repair_attempts=0)
        texts = cvsi_texts(strict, images, queries, progress=False)
        assert cvsi_texts(strict, images, queries, progress=False).calls == 0  # unusable answers are cached too
    assert 0 < len(texts.failures) < items
    assert all("unusable answer" in why or "no captions" in why for why in texts.failures.values())
    assert "failed (first: " in caplog.text
    assert set(texts.captions) == set(images) and set(texts.edits) == {query[0] for query in queries}
    for name, captions in texts.captions.items():
        assert captions == ([] if f"image {name}" in texts.failures else scene_captions(scenes[name], 3))
    for query_id, reference, _ in queries:
        edit = texts.edits[query_id]
        if f"query {query_id}" in texts.failures:  # the unedited captions stand in
            assert edit.captions == texts.captions[reference] and edit.added == []
        else:
            assert edit.captions == scene_captions(scenes[targets[query_id]], 3)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_dead_or_refusing_endpoint_stops_with_how_to_start_the_oracle(bench, tmp_path):
    images, queries, _ = _split(bench, "val")
    dead = f"http://127.0.0.1:{_free_port()}/v1"
    with pytest.raises(CVSIEndpointError, match="nothing answers at .*127.0.0.1.*launch/scene_oracle.py"):
        cvsi_texts(_config(tmp_path, dead, max_retries=1), images, queries, progress=False)
    with _oracle(bench) as (endpoint, _):
        config = _config(tmp_path, endpoint, editor_endpoint=endpoint.replace("/v1", "/nowhere"))
        with pytest.raises(CVSIEndpointError, match="cvsi_edit: .*/nowhere refused the request .*scene_oracle.py"):
            cvsi_texts(config, images, queries, progress=False)


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="methods.cvsi.captioner"):
        CVSIConfig(captioner="blip")
    with pytest.raises(ValueError, match="methods.cvsi.captions_per_image"):
        CVSIConfig(captions_per_image=0)
    with pytest.raises(ValueError, match="methods.cvsi.gallery_image_weight"):
        CVSIConfig(gallery_image_weight=0.0, gallery_caption_weight=0.0)


@pytest.fixture
def tiny_coca(tmp_path_factory):
    """A CoCa small enough to generate on the CPU in milliseconds, registered with open_clip by name.

    One torch thread meanwhile: on a busy machine, thread pools spinning over such tiny ops cost 30x the work.
    """
    directory = tmp_path_factory.mktemp("coca_config")
    (directory / "CvsiTestCoca.json").write_text(json.dumps(TINY_COCA))
    open_clip.add_model_config(directory)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield "CvsiTestCoca"
    finally:
        torch.set_num_threads(threads)


def test_coca_captions_are_deterministic_and_cached(bench, tmp_path, tiny_coca, monkeypatch):
    images = dict(list(_split(bench, "val")[0].items())[:3])
    config = CVSIConfig(
        captioner="coca",
        coca_model=tiny_coca,
        coca_pretrained=None,
        coca_device="cpu",
        coca_max_tokens=12,
        cache_dir=str(tmp_path / "a"),
    )
    first = cvsi_texts(config, images, [], progress=False)
    assert first.calls == len(images) and not first.failures
    for captions in first.captions.values():
        assert len(captions) == 3 and all(isinstance(text, str) and text for text in captions)
    assert len({tuple(captions) for captions in first.captions.values()}) > 1  # the image decides the captions
    fresh = cvsi_texts(CVSIConfig(**{**config.__dict__, "cache_dir": str(tmp_path / "b")}), images, [], progress=False)
    assert fresh.captions == first.captions  # deterministic, not just cached

    def no_model(*args, **kwargs):
        raise AssertionError("a cached rerun must not load CoCa")

    monkeypatch.setattr("training.zeroshot.cvsi_coca.CocaCaptioner.__init__", no_model)
    rerun = cvsi_texts(config, images, [], progress=False)
    assert rerun.calls == 0 and rerun.captions == first.captions


def test_absent_coca_weights_give_a_clear_error(bench, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never reach for the hub: the tag is simply not cached here
    images = dict(list(_split(bench, "val")[0].items())[:1])
    config = CVSIConfig(captioner="coca", coca_cache_dir=str(tmp_path / "empty"), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(PretrainedWeightsUnavailable, match="methods.cvsi.coca_weights_file"):
        cvsi_texts(config, images, [], progress=False)
