"""A client of any OpenAI-compatible chat-completions endpoint (vLLM, SGLang, a hosted API): rate-limited, with
exponential backoff on 429, 5xx, timeouts and dropped connections, honouring `Retry-After`.

Each request has a total deadline (`timeout_s`: connect, headers and the whole body) and a size limit
(`max_response_bytes`), both enforced by `shards.generate.bounded_http`: a slow or hostile endpoint can hold a worker
no longer than the deadline, nor hand it more than the limit. An answer over the limit fails at once (no retry: the
same question would get the same answer), so it is never cached nor quoted back in a repair turn.

The API key is read from the environment variable the config names (or the config itself) and only ever placed in
the `Authorization` header: no message, log line or record built here contains it.
"""

from __future__ import annotations

import http.client
import json
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from shards.generate import bounded_http
from shards.generate.bounded_http import DEFAULT_MAX_RESPONSE_BYTES

RETRIED_STATUS = frozenset({408, 425, 429})
"""Besides every 5xx: a timeout, too early, rate limited."""
REFUSED_STATUS = frozenset({401, 403, 404})
"""Answers that no retry and no other pair can change: a wrong key, a wrong URL or model."""


class EndpointError(RuntimeError):
    """A request that failed for good (retries used up, or an answer with no usable text); `reason` is short."""

    def __init__(self, reason: str, detail: str = "", calls: int = 0) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.calls = calls
        """Requests sent before giving up."""


class EndpointRefused(EndpointError):
    """The endpoint refused the request itself (401/403/404): every other request would fail the same way."""


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    calls: int = 0
    """HTTP requests sent, retries included."""

    def add(self, other: Usage) -> None:
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.calls += other.calls


@dataclass
class Completion:
    text: str
    usage: Usage = field(default_factory=Usage)


class RateLimiter:
    """At most `per_second` request starts per second from this process (0: no limit)."""

    def __init__(self, per_second: float) -> None:
        self.interval = 1.0 / per_second if per_second > 0 else 0.0
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        if not self.interval:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self.interval
        time.sleep(max(0.0, start - now))


class ChatClient:
    """POSTs to `<endpoint>/chat/completions` with retries; one per worker process."""

    def __init__(
        self,
        endpoint: str,
        model: str,
        api_key: str | None,
        timeout_s: float = 120.0,
        max_retries: int = 6,
        backoff_s: float = 1.0,
        requests_per_second: float = 0.0,
        max_tokens: int = 1024,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    ) -> None:
        """`timeout_s`: the total deadline of one request (connect, headers, whole body), in seconds;
        `max_response_bytes`: the longest answer body accepted."""
        self.url = endpoint.rstrip("/") + "/chat/completions"
        self.model = model
        self.timeout_s, self.max_retries, self.backoff_s = timeout_s, max_retries, backoff_s
        self.max_tokens = max_tokens
        self.max_response_bytes = max_response_bytes
        self.limiter = RateLimiter(requests_per_second)
        self._headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"

    def complete(self, messages: list[dict[str, Any]], response_format: dict[str, Any] | None = None) -> Completion:
        """The first choice's text; raises EndpointError once the retries are used up."""
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "temperature": 0,
            "max_tokens": self.max_tokens,
        }
        if response_format is not None:
            body["response_format"] = response_format
        usage = Usage()
        last, hint = "no attempt", None
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self._wait(attempt, hint))
                hint = None
            self.limiter.wait()
            usage.calls += 1
            try:
                reply = bounded_http.request(
                    "POST", self.url, json.dumps(body).encode(), self._headers, self.timeout_s, self.max_response_bytes
                )
            except bounded_http.ResponseTooLarge as error:
                if error.status in REFUSED_STATUS:
                    raise EndpointRefused(f"http {error.status}", self._refused_detail(), usage.calls) from None
                raise EndpointError("response too large", str(error), usage.calls) from None
            except TimeoutError:  # the total deadline (or a connect that timed out)
                last = "timeout"
                continue
            except (OSError, http.client.HTTPException):  # refused, reset or dropped mid-answer
                last = "connection error"
                continue
            if reply.status in REFUSED_STATUS:
                raise EndpointRefused(f"http {reply.status}", self._refused_detail(), usage.calls)
            if reply.status in RETRIED_STATUS or reply.status >= 500:
                last = f"http {reply.status}"
                hint = reply.headers.get("Retry-After")
                continue
            if reply.status >= 400:
                raise EndpointError(f"http {reply.status}", _text(reply.body[:800])[:200], usage.calls)
            return self._parse(reply, usage)
        raise EndpointError(last, f"gave up after {self.max_retries + 1} attempts", usage.calls)

    def _refused_detail(self) -> str:
        return f"{self.url} refused the request ({self.model})"

    def _wait(self, attempt: int, retry_after: str | None) -> float:
        """The server's `Retry-After` seconds when it sent them, else exponential backoff with jitter."""
        if retry_after is not None:
            try:
                return min(60.0, max(0.0, float(retry_after)))
            except ValueError:
                pass
        return min(60.0, self.backoff_s * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)

    @staticmethod
    def _parse(reply: bounded_http.Reply, usage: Usage) -> Completion:
        try:
            payload = json.loads(reply.body)
            text = payload["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise EndpointError("unreadable completion", _text(reply.body[:800])[:200], usage.calls) from None
        if not isinstance(text, str):
            raise EndpointError("unreadable completion", "message content is not text", usage.calls)
        counted = payload.get("usage")
        if isinstance(counted, dict):  # optional in the protocol; a server may send nonsense in it
            usage.prompt_tokens += _count(counted.get("prompt_tokens"))
            usage.completion_tokens += _count(counted.get("completion_tokens"))
        return Completion(text, usage)


def _text(body: bytes) -> str:
    return body.decode("utf-8", errors="replace")


def _count(value: Any) -> int:
    return value if isinstance(value, int) and value >= 0 else 0
