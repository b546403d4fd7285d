"""The persistent response cache: one small JSON file per request, so a rerun, or a run resumed after a kill, asks
the endpoint nothing it has already answered.

A request's key covers the prompt version, the model, the stage, the content hashes of its images, the text of
every message (which holds the earlier stages' answers and any repair turn), `max_tokens` and the answer schema.
Unusable answers are kept too: a rerun replays the same repair conversation and reaches the same result. Writes go
to a temporary name and are renamed into place, so concurrent workers and kills leave only whole entries.

An answer longer than the client's `max_response_bytes` is never stored (the client fails it), and an entry over
that limit when read (written by an older version, or by hand) is dropped and asked again: a cache file is never
an open door for an answer the endpoint could not send today.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shards.generate.client import ChatClient, Usage

logger = logging.getLogger(__name__)
_ESCAPED_BYTES_PER_BYTE = 6
"""The most bytes JSON's escaping (`\\u0001`) writes per byte of text: bounds an entry's file by its text."""


def request_key(
    prompt_version: str, model: str, stage: str, image_hashes: list[str], messages: list[dict], settings: dict
) -> str:
    """sha256 of everything that decides the answer, images by content hash (never by path); `settings` holds the
    rest of the request (`max_tokens`, the answer schema)."""
    texts = []
    for message in messages:
        content = message["content"]
        parts = content if isinstance(content, list) else [{"type": "text", "text": content}]
        texts.append([message["role"], [part.get("text", "<image>") for part in parts]])
    payload = {
        "version": prompt_version,
        "model": model,
        "stage": stage,
        "images": image_hashes,
        "messages": texts,
        "settings": settings,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


class ResponseCache:
    """`<root>/<key[:2]>/<key>.json` holding `{"text", "prompt_tokens", "completion_tokens"}`."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str, max_text_bytes: int | None = None) -> dict[str, Any] | None:
        """The entry of `key`, or None when there is none or it is unusable.

        Args:
            max_text_bytes: an entry whose text is longer (in UTF-8) is deleted and reported absent; its file is
                not even read when its size alone says so.
        """
        path = self._path(key)
        try:
            if max_text_bytes is not None and path.stat().st_size > _ESCAPED_BYTES_PER_BYTE * max_text_bytes + 4096:
                return self._drop(path, max_text_bytes)
            entry = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except ValueError:  # not written by this class (renames are atomic); treat it as absent and rewrite it
            return None
        if not isinstance(entry, dict) or not isinstance(entry.get("text"), str):
            return None
        if max_text_bytes is not None and len(entry["text"].encode("utf-8", errors="replace")) > max_text_bytes:
            return self._drop(path, max_text_bytes)
        return entry

    @staticmethod
    def _drop(path: Path, max_text_bytes: int) -> None:
        logger.warning(
            "dropping cached answer %s: longer than max_response_bytes=%d; asking again", path, max_text_bytes
        )
        path.unlink(missing_ok=True)
        return None

    def put(self, key: str, entry: dict[str, Any]) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(entry, sort_keys=True))
        os.replace(temporary, path)

    def __len__(self) -> int:
        return sum(1 for _ in self.root.glob("*/*.json")) if self.root.is_dir() else 0


def cached_completion(
    client: ChatClient,
    cache: ResponseCache,
    key_parts: tuple[str, str, str, list[str]],
    messages: list[dict],
    answer_format: dict[str, Any],
    max_tokens: int,
    usage: Usage,
) -> tuple[str, bool]:
    """The answer text of one request: from `cache`, or from `client` and then cached.

    Args:
        key_parts: (prompt version, model, stage, image content hashes), the request's identity with the messages.
        usage: gets the calls (retries included) and tokens the request cost; nothing when it was cached.

    Returns:
        (text, whether it came from the cache).

    Raises:
        shards.generate.client.EndpointError: the request failed; its calls are added to `usage` first.
    """
    from shards.generate.client import EndpointError

    settings = {"max_tokens": max_tokens, "response_format": answer_format}
    key = request_key(*key_parts, messages, settings)
    cached = cache.get(key, client.max_response_bytes)  # an answer the client would refuse today is no cache hit
    if cached is not None:
        return cached["text"], True
    try:
        completion = client.complete(messages, answer_format)
    except EndpointError as error:
        usage.calls += error.calls
        raise
    usage.add(completion.usage)
    entry = {
        "text": completion.text,
        "prompt_tokens": completion.usage.prompt_tokens,
        "completion_tokens": completion.usage.completion_tokens,
    }
    cache.put(key, entry)
    return completion.text, False
