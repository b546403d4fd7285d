"""The data generator end to end against the scene oracle (a subprocess on 127.0.0.1 with 10 % faults), and its
parts against an endpoint that answers garbage, 500s and nothing at all."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from oracle_fixtures import make_synthetic, scene_oracle

from shards.builder.shard_set import build_shards
from shards.config import DataConfig, NounPhraseConfig, SourceConfig
from shards.generate.cache import ResponseCache
from shards.generate.client import ChatClient, EndpointRefused
from shards.generate.config import GenerateConfig
from shards.generate.pairs import Pair, PairRunner
from shards.generate.protocol import load_prompts
from shards.model_inputs import TINY_BACKBONE

REPO = Path(__file__).resolve().parents[2]
KEY_VARIABLE = "CTX_TEST_GENERATE_KEY"
SECRET = "sk-test-7f3a9c1e-do-not-log"
OUTPUTS = (
    "rewritten_captions/rewritten_train.json",
    "manifest_train.jsonl",
    "objects/objects_train.jsonl",
    "failures_train.jsonl",
    "trees_train.jsonl",
)


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONPATH": str(REPO), **extra}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("generate") / "synthetic")


@pytest.fixture(scope="module")
def oracle(synthetic, tmp_path_factory):
    """The scene oracle with 10 % faults, requiring the test's API key; stopped by pid."""
    arguments = ("--fault-rate", "0.1", "--api-key-env", KEY_VARIABLE)
    with scene_oracle(synthetic, tmp_path_factory.mktemp("oracle"), *arguments, env={KEY_VARIABLE: SECRET}) as url:
        yield url


def _config(tmp_path: Path, synthetic: Path, endpoint: str, name: str, concurrency: int) -> tuple[Path, Path]:
    out = tmp_path / name
    config = tmp_path / f"{name}.yaml"
    config.write_text(f"""
model: {{backbone: {TINY_BACKBONE}}}
data:
  sources: [{{name: synthetic, kind: cirr, path: {synthetic}, split: train, trees: {synthetic / "trees.jsonl"}}}]
  shards_dir: {tmp_path / "unused"}
generate:
  source: synthetic
  out: {out}
  image_root: {synthetic}
  endpoint: {endpoint}
  api_key_env: {KEY_VARIABLE}
  concurrency: {concurrency}
  backoff_s: 0.05
  trees: synthetic
cluster: {{num_workers: 1}}
""")
    return config, out


def _generate(config: Path, key: str = SECRET) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO / "launch/generate.py"), "--config", str(config)]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=_env(**{KEY_VARIABLE: key}))


def _summary(out: Path) -> dict:
    return json.loads((out / "summary_train.json").read_text())


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_every_pair_is_accounted_for_cached_resumable_and_independent_of_workers(oracle, synthetic, tmp_path):
    config, out = _config(tmp_path, synthetic, oracle, "two_workers", concurrency=2)
    first = _generate(config)
    assert first.returncode == 0, first.stderr[-3000:]
    summary = _summary(out)
    failed = sum(summary["failures"].values())
    assert summary["pairs"] == summary["pairs_with_triplets"] + failed > 0
    assert summary["repairs"] > 0 and summary["endpoint_calls"] > 3 * summary["pairs"]  # the faults happened
    assert summary["prompt_tokens"] > 0 and summary["completion_tokens"] > 0
    produced = {name: (out / name).read_bytes() for name in OUTPUTS}

    rerun = _generate(config)
    assert rerun.returncode == 0 and _summary(out)["endpoint_calls"] == 0  # the cache answered everything
    assert {name: (out / name).read_bytes() for name in OUTPUTS} == produced

    # One worker, killed once its cache holds a third of the answers, then started again: the same bytes.
    config, single = _config(tmp_path, synthetic, oracle, "one_worker", concurrency=1)
    command = [sys.executable, str(REPO / "launch/generate.py"), "--config", str(config)]
    job = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=_env(**{KEY_VARIABLE: SECRET}),
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while len(ResponseCache(single / "cache")) < summary["pairs"]:
            assert job.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    assert not (single / "summary_train.json").exists()
    resumed = _generate(config)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert 0 < _summary(single)["endpoint_calls"] < summary["endpoint_calls"]
    assert {name: (single / name).read_bytes() for name in OUTPUTS} == produced

    # Both released layouts build into shards, noun phrases from the written trees.
    triplets = summary["triplets"]
    for source in (
        SourceConfig(name="gen", kind="cirr_r", path=str(out), image_root=str(synthetic), trees=str(out / OUTPUTS[4])),
        SourceConfig(name="gen", kind="jsonl", path=str(out / OUTPUTS[1]), trees=str(out / OUTPUTS[4])),
    ):
        data = DataConfig(
            sources=[source],
            shards_dir=str(tmp_path / f"shards-{source.kind}"),
            samples_per_shard=50,
            image_short_side=32,
            build_workers=1,
            noun_phrases=NounPhraseConfig(parser="trees"),
        )
        report = build_shards(data, TINY_BACKBONE, progress=False)
        assert report.samples == triplets and report.skipped == 0
        assert report.sources["gen"]["noun_phrases"] >= triplets

    # The key went into request headers only: not into any output, cache entry or log.
    logs = first.stdout + first.stderr + rerun.stdout + rerun.stderr + resumed.stdout + resumed.stderr
    assert SECRET not in logs
    for directory in (out, single, Path("/tmp/ray/session_latest/logs")):
        for path in directory.rglob("*"):
            if path.is_file() and path.stat().st_size < 50_000_000:
                assert SECRET.encode() not in path.read_bytes(), path

    wrong = _generate(config, key="sk-wrong")
    assert wrong.returncode == 2 and "refused the API key" in wrong.stderr and "Traceback" not in wrong.stderr


class _Broken(BaseHTTPRequestHandler):
    """Answers by the pair: `garbage` (200, not a completion), `500`, `hang` (past the timeout), `prose` (200, a
    completion whose text is not JSON)."""

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        mode = body["messages"][1]["content"][1]["image_url"]["url"].rsplit(",", 1)[1]
        mode = __import__("base64").b64decode(mode).decode().split(":")[0]
        if mode == "hang":
            time.sleep(1.5)
        if mode == "500":
            self.send_response(500)
            self.end_headers()
            return
        text = (
            b"<html>oops</html>"
            if mode == "garbage"
            else json.dumps(
                {"choices": [{"message": {"content": "Sure! Here are the objects: a cat."}}], "usage": {}}
            ).encode()
        )
        self.send_response(200)
        self.send_header("Content-Length", str(len(text)))
        self.end_headers()
        self.wfile.write(text)


def test_garbage_500s_and_timeouts_end_as_counted_failures(tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Broken)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_address[1]}/v1"
        config = GenerateConfig(endpoint=endpoint, max_retries=1, backoff_s=0.01, repair_attempts=1)
        client = ChatClient(endpoint, "m", None, timeout_s=0.5, max_retries=1, backoff_s=0.01)
        runner = PairRunner(config, load_prompts(), client, ResponseCache(tmp_path / "cache"))
        results = {}
        for mode in ("garbage", "500", "hang", "prose"):
            image = tmp_path / f"{mode}.png"
            image.write_bytes(f"{mode}:image".encode())
            results[mode] = runner.run(Pair(mode, str(image), str(image)))
    finally:
        server.shutdown()
        server.server_close()
    assert {mode: result.failure for mode, result in results.items()} == {
        "garbage": "endpoint_unreadable_completion",
        "500": "endpoint_http_500",
        "hang": "endpoint_timeout",
        "prose": "reference_objects_unusable",
    }
    assert results["500"].calls == 2 and results["prose"].repairs == 1
    assert "not JSON" in results["prose"].failure_detail


def test_a_refused_key_stops_instead_of_failing_every_pair(synthetic, oracle, tmp_path):
    client = ChatClient(oracle, "scene-oracle", "sk-wrong", max_retries=0)
    runner = PairRunner(GenerateConfig(endpoint=oracle), load_prompts(), client, ResponseCache(tmp_path / "c"))
    image = next((synthetic / "train").rglob("*.png"))
    with pytest.raises(EndpointRefused, match="http 401"):
        runner.run(Pair("p", str(image), str(image)))


def test_mined_pairs_keep_k_neighbours_inside_the_band_seeded(synthetic, tmp_path):
    from eval_fixtures import write_checkpoint

    from cluster.root_config import load_config
    from shards.generate.config import MiningConfig
    from training.retrieval.bundle import export_bundle
    from training.retrieval.mining import mine_pairs

    config = load_config(REPO / "configs" / "tiny.yaml", [f"cluster.storage_path={tmp_path / 'runs'}"])
    export_bundle(write_checkpoint(config.run_dir, 10, config, seed=5), tmp_path / "bundle")
    command = [
        sys.executable,
        str(REPO / "launch/index.py"),
        "--bundle",
        str(tmp_path / "bundle"),
        "--images",
        str(synthetic / "train"),
        "--out",
        str(tmp_path / "index"),
        "index.workers=0",
    ]
    built = subprocess.run(command, capture_output=True, text=True, timeout=300, env=_env())
    assert built.returncode == 0, built.stderr[-2000:]

    everything = MiningConfig(index=str(tmp_path / "index"), k=2, min_similarity=-1.0, max_similarity=1.0, candidates=8)
    mined = mine_pairs(everything, progress=False)
    images = sorted(str(path.resolve()) for path in (synthetic / "train").rglob("*.png"))
    assert len(mined) == 2 * len(images)  # every image, k neighbours, never itself
    assert all(pair.reference != pair.target for pair, _ in mined)
    assert {pair.reference for pair, _ in mined} == set(images)
    assert [pair for pair, _ in mine_pairs(everything, progress=False)] == [pair for pair, _ in mined]
    reseeded = MiningConfig(index=everything.index, k=2, min_similarity=-1.0, max_similarity=1.0, candidates=8, seed=1)
    assert [pair for pair, _ in mine_pairs(reseeded, progress=False)] != [pair for pair, _ in mined]

    scores = sorted(score for _, score in mined)
    low, high = scores[len(scores) // 4], scores[3 * len(scores) // 4]
    band = MiningConfig(index=everything.index, k=2, min_similarity=low, max_similarity=high, candidates=8)
    banded = mine_pairs(band, progress=False)
    assert banded and all(low <= score <= high for _, score in banded)
    per_image = {}
    for pair, _ in banded:
        per_image[pair.reference] = per_image.get(pair.reference, 0) + 1
    assert max(per_image.values()) <= 2


class _RefusingCompletions(BaseHTTPRequestHandler):
    """Lists its models to anyone, as some servers do, but answers every chat completion 401."""

    def log_message(self, *args) -> None:
        pass

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._send(200, {"object": "list", "data": [{"id": "m", "object": "model"}]})

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._send(401, {"error": {"message": "invalid API key"}})


def test_a_key_that_completions_refuse_is_one_error_line(tmp_path):
    """`launch/generate.py` against an endpoint whose /models answers but whose completions refuse the key: exit 2
    and exactly one line, `generate error: ... http 401`, with no Ray Data ERROR/INFO lines before it."""
    from PIL import Image

    for name, colour in (("a.png", "red"), ("b.png", "blue")):
        Image.new("RGB", (32, 32), colour).save(tmp_path / name)
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"id": "p0", "reference": "a.png", "target": "b.png"}) + "\n")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _RefusingCompletions)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        config = tmp_path / "refused.yaml"
        config.write_text(f"""
data: {{shards_dir: {tmp_path / "unused"}}}
generate:
  pairs: {tmp_path / "pairs.jsonl"}
  out: {tmp_path / "out"}
  endpoint: http://127.0.0.1:{server.server_address[1]}/v1
  model: m
  api_key_env: {KEY_VARIABLE}
  concurrency: 1
cluster: {{num_workers: 1}}
""")
        command = [sys.executable, str(REPO / "launch/generate.py"), "--config", str(config)]
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=300, env=_env(**{KEY_VARIABLE: "sk-refused"})
        )
    finally:
        server.shutdown()
        server.server_close()
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert done.returncode == 2, lines
    assert len(lines) == 1 and lines[0].startswith("generate error: ") and "http 401" in lines[0], lines
    assert "sk-refused" not in lines[0]
