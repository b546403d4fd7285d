"""The persistent response cache: one small JSON file per request, so a rerun, or a run resumed after a kill, asks
the endpoint nothing it has already answered.

A request's key covers the prompt version, the model, the stage, the content hashes of its images, the text of
every message (which holds the earlier stages' answers and any repair turn), `max_tokens` and the answer schema. Unusable answers are kept too: a rerun
replays the same repair conversation and reaches the same result. Writes go to a temporary name and are renamed
into place, so concurrent workers and kills leave only whole entries.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shards.generate.client import ChatClient, Usage


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

    def get(self, key: str) -> dict[str, Any] | None:
        path = self._path(key)
        try:
            entry = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except ValueError:  # not written by this class (renames are atomic); treat it as absent and rewrite it
            return None
        return entry if isinstance(entry, dict) and isinstance(entry.get("text"), str) else None

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
    cached = cache.get(key)
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
