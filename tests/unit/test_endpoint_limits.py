"""The endpoint client's two limits, against local servers on 127.0.0.1 (threads of the test, stopped in `finally`):
`timeout_s` is a total deadline per request (connect, headers and whole body), and `max_response_bytes` caps what
is read, cached and quoted back in a repair turn."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from shards.generate import bounded_http
from shards.generate.cache import ResponseCache
from shards.generate.client import ChatClient, EndpointError
from shards.generate.config import GenerateConfig
from shards.generate.pairs import Pair, PairRunner
from shards.generate.protocol import load_prompts

TRICKLE_BYTES = 40
TRICKLE_GAP_S = 0.15
"""A trickled answer takes 6 s; the deadline in the tests is 0.6 s."""


@contextmanager
def serving(handler: type[BaseHTTPRequestHandler]) -> Iterator[tuple[str, ThreadingHTTPServer]]:
    """`handler` on a free 127.0.0.1 port in a thread; yields the `/v1` base URL and the server (its `bodies` keep
    what handlers record); always stopped."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True  # a handler still trickling must not hold the test's exit
    server.stop = threading.Event()
    server.bodies = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", server
    finally:
        server.stop.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _completion(text: str) -> bytes:
    return json.dumps({"choices": [{"message": {"content": text}}], "usage": {}}).encode()


class _Trickle(BaseHTTPRequestHandler):
    """`/v1/body/...`: 200 and its headers at once, then the body one byte every TRICKLE_GAP_S; `/v1/headers/...`:
    the status line at once, then the headers a byte at a time."""

    def log_message(self, *args) -> None:
        pass

    def _dribble(self, data: bytes) -> None:
        for byte in data:
            if self.server.stop.wait(TRICKLE_GAP_S):
                return
            try:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
            except OSError:  # the client gave up: what the deadline is for
                return

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        body = b" " * (TRICKLE_BYTES - 2) + b"{}"
        if "/headers/" in self.path:
            self.wfile.write(b"HTTP/1.1 200 OK\r\n")
            self.wfile.flush()
            self._dribble(b"X-Slow: " + b"a" * TRICKLE_BYTES + b"\r\nContent-Length: 2\r\n\r\n{}")
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self._dribble(body)


@pytest.mark.parametrize("phase", ["body", "headers"])
def test_a_trickling_endpoint_is_cut_off_at_the_total_deadline(phase) -> None:
    """Each attempt ends at timeout_s however steadily the bytes come; the request fails as a timeout."""
    with serving(_Trickle) as (endpoint, _):
        client = ChatClient(f"{endpoint}/{phase}", "m", None, timeout_s=0.6, max_retries=1, backoff_s=0.01)
        started = time.monotonic()
        with pytest.raises(EndpointError) as failure:
            client.complete([{"role": "user", "content": "hi"}])
        elapsed = time.monotonic() - started
    assert failure.value.reason == "timeout" and failure.value.calls == 2
    assert elapsed < 2.5, f"two attempts of 0.6 s took {elapsed:.1f} s: the deadline did not hold"


def test_the_deadline_leaves_a_prompt_answer_alone() -> None:
    class Prompt(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            answer = _completion("ok")
            self.send_response(200)
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

    with serving(Prompt) as (endpoint, _):
        completion = ChatClient(endpoint, "m", None, timeout_s=5).complete([{"role": "user", "content": "hi"}])
    assert completion.text == "ok" and completion.usage.calls == 1


HUGE = "x" * 50_000
LIMIT = 20_000


class _Huge(BaseHTTPRequestHandler):
    """Answers every request with a 50 KB completion text (not JSON), chunked (no length to refuse it by) or not;
    keeps every request body."""

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        self.server.bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
        answer = _completion(HUGE)
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for start in range(0, len(answer), 4096):
            piece = answer[start : start + 4096]
            self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        self.wfile.write(b"0\r\n\r\n")


def _runner(endpoint: str, cache: Path, max_response_bytes: int) -> PairRunner:
    config = GenerateConfig(endpoint=endpoint, max_retries=2, backoff_s=0.01, repair_attempts=1)
    client = ChatClient(endpoint, "m", None, timeout_s=10, max_retries=2, max_response_bytes=max_response_bytes)
    return PairRunner(config, load_prompts(), client, ResponseCache(cache))


def test_an_answer_over_max_response_bytes_is_a_counted_failure_not_a_cache_entry(tmp_path) -> None:
    """Not retried, not cached, never quoted back in a repair turn; a cache entry over the limit (left by a run
    without it) is dropped on read and asked again."""
    image = tmp_path / "pair.png"
    image.write_bytes(b"an image")
    pair = Pair("p", str(image), str(image))
    with serving(_Huge) as (endpoint, _):
        result = _runner(endpoint, tmp_path / "cache", LIMIT).run(pair)
        assert result.failure == "endpoint_response_too_large" and result.calls == 1
        assert f"longer than {LIMIT} bytes" in result.failure_detail
        assert len(ResponseCache(tmp_path / "cache")) == 0

        # A cache poisoned as the old code left it: the 50 KB answer stored, under a generous limit.
        poisoned = _runner(endpoint, tmp_path / "old", 10 * LIMIT).run(pair)
        assert poisoned.failure == "reference_objects_unusable" and len(ResponseCache(tmp_path / "old")) == 2
        reread = _runner(endpoint, tmp_path / "old", LIMIT).run(pair)
        assert reread.failure == "endpoint_response_too_large" and reread.cache_hits == 0 and reread.calls == 1
        assert len(ResponseCache(tmp_path / "old")) == 1  # the first answer is dropped; the repair turn's stays
    assert reread.failure_detail.endswith(f"longer than {LIMIT} bytes")


def test_no_repair_turn_quotes_an_oversize_answer(tmp_path) -> None:
    image = tmp_path / "pair.png"
    image.write_bytes(b"an image")
    with serving(_Huge) as (endpoint, server):
        result = _runner(endpoint, tmp_path / "cache", LIMIT).run(Pair("p", str(image), str(image)))
    assert result.repairs == 0 and len(server.bodies) == 1  # the one question, no repair turn after it
    assert b"xxxxxxxxxx" not in server.bodies[0]


def test_a_declared_length_over_the_limit_is_refused_unread() -> None:
    class Declared(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Length", str(50 * 2**20))  # 50 MB announced, none sent
            self.end_headers()

    with serving(Declared) as (endpoint, _):
        started = time.monotonic()
        with pytest.raises(bounded_http.ResponseTooLarge):
            bounded_http.request("POST", endpoint, b"{}", {}, timeout_s=5, max_bytes=LIMIT)
    assert time.monotonic() - started < 2.5
