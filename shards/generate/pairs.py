"""One image pair through the pipeline: three questions (each answer checked, repaired when unusable, cached), then
captions composed and filtered. Every pair ends as triplets or as a failure with its reason; nothing raises but a
refusal by the endpoint itself (a wrong key or URL), which would fail every pair alike."""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from shards.generate.cache import ResponseCache, cached_completion
from shards.generate.client import ChatClient, EndpointError, EndpointRefused, Usage
from shards.generate.compose import compose_captions, filter_captions, pair_rng
from shards.generate.config import GenerateConfig
from shards.generate.protocol import (
    STAGES,
    Prompts,
    ResponseError,
    ask_repairing,
    parse_answer,
    response_format,
    stage_messages,
)

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def pair_ids(raw: list[str]) -> list[str]:
    """File-safe ids for raw ones (image names or paths joined); where two raw ids would become the same safe id,
    each of those gets a short hash of its raw id, so ids stay unique and independent of order."""
    safe = [_UNSAFE.sub("_", text) for text in raw]
    taken = Counter(safe)
    return [
        text if taken[text] == 1 else f"{text}-{hashlib.sha256(original.encode()).hexdigest()[:8]}"
        for text, original in zip(safe, raw)
    ]


@dataclass
class Pair:
    id: str
    reference: str
    """Absolute path of the reference image."""
    target: str


@dataclass
class PairResult:
    """What became of one pair: `captions` when it succeeded, `failure` (a short reason) when not."""

    id: str
    reference: str
    target: str
    prompt_version: str
    model: str
    answers: dict[str, Any] = field(default_factory=dict)
    """Each stage's parsed answer (the object lists and the single modifications)."""
    captions: list[str] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)
    """Captions dropped by the filters, by reason."""
    failure: str | None = None
    failure_detail: str = ""
    repairs: int = 0
    calls: int = 0
    """Requests sent to the endpoint for this pair (0 when every answer came from the cache)."""
    cache_hits: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class _Failed(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason, self.detail = reason, detail


class PairRunner:
    """Runs pairs against one endpoint client, with the cache; one per worker."""

    def __init__(self, config: GenerateConfig, prompts: Prompts, client: ChatClient, cache: ResponseCache) -> None:
        self.config, self.prompts, self.client, self.cache = config, prompts, client, cache

    def run(self, pair: Pair) -> PairResult:
        result = PairResult(pair.id, pair.reference, pair.target, self.prompts.version, self.config.model)
        try:
            reference, target = Path(pair.reference).read_bytes(), Path(pair.target).read_bytes()
        except OSError as error:
            result.failure, result.failure_detail = "image_unreadable", f"{type(error).__name__}: {error}"
            return result
        hashes = [hashlib.sha256(reference).hexdigest(), hashlib.sha256(target).hexdigest()]
        try:
            for stage in STAGES:
                messages = stage_messages(self.prompts, stage, reference, target, result.answers)
                result.answers[stage] = self._ask(stage, messages, hashes, result)
        except _Failed as failed:
            result.failure, result.failure_detail = failed.reason, failed.detail
            return result
        texts = [item["text"] for item in result.answers["modifications"]["modifications"]]
        if not texts:
            result.failure = "no_modifications"
            return result
        config = self.config
        composed = compose_captions(
            texts, config.max_modifications, config.captions_per_pair, pair_rng(config.seed, pair.id)
        )
        kept, dropped = filter_captions(
            composed,
            result.answers["target_objects"]["objects"],
            config.min_words,
            config.dedupe,
            config.leakage_filter,
        )
        result.captions, result.dropped = kept, dict(dropped)
        if not kept:
            result.failure = "all_captions_filtered"
        return result

    def _ask(self, stage: str, messages: list[dict], hashes: list[str], result: PairResult) -> dict[str, Any]:
        """The stage's parsed answer, repairing an unusable one up to `repair_attempts` times."""

        def complete(turns: list[dict]) -> str:
            return self._complete(stage, turns, hashes, result)

        def count_repair() -> None:
            result.repairs += 1

        try:
            return ask_repairing(
                complete,
                partial(parse_answer, stage),
                self.prompts,
                messages,
                self.config.repair_attempts,
                count_repair,
            )
        except ResponseError as problem:
            raise _Failed(f"{stage}_unusable", str(problem)) from None

    def _complete(self, stage: str, messages: list[dict], hashes: list[str], result: PairResult) -> str:
        usage = Usage()
        key_parts = (self.prompts.version, self.config.model, stage, hashes)
        try:
            text, cached = cached_completion(
                self.client, self.cache, key_parts, messages, response_format(stage), self.config.max_tokens, usage
            )
        except EndpointRefused:
            raise
        except EndpointError as error:
            result.calls += usage.calls
            raise _Failed(f"endpoint_{error.reason.replace(' ', '_')}", str(error)) from None
        result.cache_hits += cached
        result.calls += usage.calls
        result.prompt_tokens += usage.prompt_tokens
        result.completion_tokens += usage.completion_tokens
        return text


def failure_counts(results: list[PairResult]) -> Counter:
    return Counter(result.failure for result in results if result.failure)
