"""CVSI's text side (DESIGN section 13): captions of every reference and gallery image, and an LLM's edit of each
query's reference captions by its modification text, with the objects the wanted image likely adds.

Both questions go through the data generator's OpenAI-compatible client (`shards.generate.client`: rate limit,
retries, backoff) and its persistent response cache (`shards.generate.cache`), so a rerun, or a run resumed after a
kill, asks nothing already answered; CoCa's captions (`methods.cvsi.captioner: coca`) are cached the same way. The
prompts are template files under `shards/generate/prompts/cvsi/`, versioned by their hash like the generator's.

An unusable answer gets `repair_attempts` repair turns; an item that still fails is counted, logged once and
replaced (no captions; an edit equal to the unedited captions), never fatal. Fatal are an endpoint that refuses
the request itself (401/403/404: every request would fail alike) and one that nothing answers at all.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from functools import cache, partial
from pathlib import Path
from typing import Any

from tqdm import tqdm

from shards.generate.cache import ResponseCache, cached_completion
from shards.generate.client import ChatClient, EndpointError, EndpointRefused, Usage
from shards.generate.protocol import (
    PROMPTS_ROOT,
    Prompts,
    ResponseError,
    ask_repairing,
    image_part,
    parse_json_answer,
)
from training.zeroshot.cvsi_config import CVSIConfig

logger = logging.getLogger(__name__)

PROMPT_SET = "cvsi"
TEMPLATES = ("system", "captions", "edit", "repair")
CAPTIONS_STAGE, EDIT_STAGE = "cvsi_captions", "cvsi_edit"
"""The `response_format` names: the scene oracle answers by them."""
UNREACHABLE_REASONS = ("connection error", "timeout")
OFFLINE_HINT = "offline, start the scene oracle: python launch/scene_oracle.py --root data/synthetic --port 8011"


@dataclass
class CaptionEdit:
    captions: list[str]
    """The reference captions rewritten by the modification text."""
    added: list[str]
    """Objects likely to be added."""


@dataclass
class CVSITexts:
    captions: dict[str, list[str]]
    """Image name -> its captions (`captions_per_image` of them; [] where captioning failed)."""
    edits: dict[str, CaptionEdit]
    """Query id -> the edit of its reference's captions."""
    calls: int
    """Endpoint requests (retries included) and CoCa generations made by this run (0 when all were cached)."""
    failures: dict[str, str] = field(default_factory=dict)
    """`image <name>` or `query <id>` -> why it failed (and got its replacement)."""


class CVSIEndpointError(RuntimeError):
    """An endpoint that refuses the requests themselves or that nothing answers at all."""


class _ItemFailed(Exception):
    """One image or query that failed for good; the message is the reason."""


@cache
def load_cvsi_prompts() -> Prompts:
    """The templates of `shards/generate/prompts/cvsi/`; the version is `cvsi-<hash of the files>`."""
    digest = hashlib.sha256()
    texts = {}
    for template in TEMPLATES:
        text = (PROMPTS_ROOT / PROMPT_SET / f"{template}.txt").read_text()
        texts[template] = text
        digest.update(template.encode() + b"\0" + text.encode() + b"\0")
    return Prompts(f"{PROMPT_SET}-{digest.hexdigest()[:8]}", texts)


def _texts(count: int, max_length: int) -> dict[str, Any]:
    item = {"type": "string", "minLength": 1, "maxLength": max_length, "pattern": "\\S"}
    return {"type": "array", "items": item, "minItems": count, "maxItems": count}


def captions_schema(count: int) -> dict[str, Any]:
    """`{"captions": [exactly count captions]}`."""
    properties = {"captions": _texts(count, 300)}
    return {"type": "object", "properties": properties, "required": ["captions"], "additionalProperties": False}


def edit_schema(count: int) -> dict[str, Any]:
    """`{"captions": [one edited caption per caption], "added": [objects]}`."""
    added = {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": 60}, "maxItems": 20}
    properties = {"captions": _texts(count, 400), "added": added}
    return {
        "type": "object",
        "properties": properties,
        "required": ["captions", "added"],
        "additionalProperties": False,
    }


class _Stage:
    """One question (captions or edits) to one endpoint, cached and repaired; thread-safe, one client per thread."""

    def __init__(self, name: str, endpoint: str, model: str, config: CVSIConfig, cache: ResponseCache) -> None:
        self.name, self.endpoint, self.model, self.config, self.cache = name, endpoint, model, config, cache
        self.prompts = load_cvsi_prompts()
        self.calls = 0
        self.answered = False
        """Whether the endpoint has answered anything in this run (else a dead connection means it is down)."""
        self._lock = threading.Lock()
        self._local = threading.local()

    def _client(self) -> ChatClient:
        if not hasattr(self._local, "client"):
            config = self.config
            self._local.client = ChatClient(
                self.endpoint,
                self.model,
                os.environ.get(config.api_key_env) or None,
                timeout_s=config.timeout_s,
                max_retries=config.max_retries,
                backoff_s=config.backoff_s,
                requests_per_second=config.requests_per_second / config.concurrency,  # shared out between threads
                max_tokens=config.max_tokens,
            )
        return self._local.client

    def ask(self, messages: list[dict[str, Any]], image_hashes: list[str], schema: dict[str, Any]) -> dict[str, Any]:
        """The parsed answer, after up to `repair_attempts` repair turns; raises _ItemFailed."""
        answer_format = {"type": "json_schema", "json_schema": {"name": self.name, "schema": schema, "strict": True}}

        def complete(turns: list[dict[str, Any]]) -> str:
            return self._complete(turns, image_hashes, answer_format)

        try:
            return ask_repairing(
                complete, partial(parse_json_answer, schema=schema), self.prompts, messages, self.config.repair_attempts
            )
        except ResponseError as problem:
            raise _ItemFailed(f"unusable answer ({problem})") from None

    def _complete(self, messages: list[dict[str, Any]], image_hashes: list[str], answer_format: dict) -> str:
        usage = Usage()
        key_parts = (self.prompts.version, self.model, self.name, image_hashes)
        try:
            text, cached = cached_completion(
                self._client(), self.cache, key_parts, messages, answer_format, self.config.max_tokens, usage
            )
        except EndpointRefused as error:
            self._count(usage.calls)
            raise CVSIEndpointError(
                f"{self.name}: {self.endpoint} refused the request ({error}); check methods.cvsi's endpoint, model "
                f"and the API key in ${self.config.api_key_env}; {OFFLINE_HINT}"
            ) from None
        except EndpointError as error:
            self._count(usage.calls)
            if error.reason in UNREACHABLE_REASONS and not self.answered:
                raise CVSIEndpointError(
                    f"{self.name}: nothing answers at {self.endpoint} ({error}); start the endpoint or set "
                    f"methods.cvsi's endpoints; {OFFLINE_HINT}"
                ) from None
            raise _ItemFailed(f"endpoint: {error}") from None
        if not cached:
            self._count(usage.calls, answered=True)
        return text

    def _count(self, calls: int, answered: bool = False) -> None:
        with self._lock:
            self.calls += calls
            self.answered = self.answered or answered


def _run_all(jobs: dict[str, Callable[[], Any]], workers: int, desc: str, progress: bool) -> dict[str, Any]:
    """Every job's result, or the _ItemFailed it raised; any other error stops the rest and is raised."""
    stop = threading.Event()

    def run(key: str) -> tuple[str, Any]:
        if stop.is_set():
            return key, None
        try:
            return key, jobs[key]()
        except _ItemFailed as failed:
            return key, failed

    results: dict[str, Any] = {}
    with (
        tqdm(total=len(jobs), desc=desc, disable=not progress or not jobs) as bar,
        ThreadPoolExecutor(max_workers=workers) as pool,
    ):
        futures = [pool.submit(run, key) for key in jobs]
        try:
            for future in as_completed(futures):
                key, result = future.result()
                results[key] = result
                bar.update()
        except BaseException:
            stop.set()  # the requests in flight finish; nothing new starts
            for future in futures:
                future.cancel()
            raise
    return results


def _file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class _Captioner:
    """Captions of one image (by content hash) from the endpoint or from CoCa, cached either way."""

    def __init__(self, config: CVSIConfig, cache: ResponseCache) -> None:
        self.count = config.captions_per_image
        self.stage = _Stage(CAPTIONS_STAGE, config.captioner_endpoint, config.captioner_model, config, cache)
        self.coca = None
        if config.captioner == "coca":
            from training.zeroshot.cvsi_coca import CachedCoca  # torch only where CoCa runs

            self.coca = CachedCoca(config, cache)

    @property
    def calls(self) -> int:
        return self.stage.calls + (self.coca.generations if self.coca is not None else 0)

    def __call__(self, path: Path, image_hash: str) -> list[str]:
        if self.coca is not None:
            try:
                return self.coca(path, image_hash)
            except OSError as error:
                raise _ItemFailed(f"unreadable image ({type(error).__name__}: {error})") from None
        prompts = self.stage.prompts
        text = {"type": "text", "text": prompts.stage_text("captions", count=str(self.count))}
        messages = [
            {"role": "system", "content": prompts.texts["system"].strip()},
            {"role": "user", "content": [text, image_part(_read(path))]},
        ]
        answer = self.stage.ask(messages, [image_hash], captions_schema(self.count))
        return [caption.strip() for caption in answer["captions"]]


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise _ItemFailed(f"unreadable image ({type(error).__name__}: {error})") from None


def _edit_messages(captions: list[str], modification: str) -> list[dict[str, Any]]:
    prompts = load_cvsi_prompts()
    text = prompts.stage_text("edit", captions=json.dumps(captions), modification=json.dumps(modification))
    return [
        {"role": "system", "content": prompts.texts["system"].strip()},
        {"role": "user", "content": [{"type": "text", "text": text}]},
    ]


def _warn(kind: str, failures: dict[str, str], total: int) -> None:
    if failures:
        item, reason = next(iter(sorted(failures.items())))
        logger.warning("cvsi: %d of %d %s failed (first: %s: %s)", len(failures), total, kind, item, reason)


def cvsi_texts(
    config: CVSIConfig, images: dict[str, Path], queries: list[tuple[str, str, str]], progress: bool = True
) -> CVSITexts:
    """Captions of every image and the edit of every query's reference captions, cached and resumable.

    Args:
        config: the `methods.cvsi` section.
        images: image name -> file (every reference and gallery image of a split).
        queries: (query id, reference image name, modification text).
        progress: show tqdm bars ("cvsi captions", "cvsi edits").

    Returns:
        Captions per image ([] where captioning failed), an edit per query (the unedited reference captions and no
        added objects where editing failed), the calls this run made, and every failure with its reason.

    Raises:
        CVSIEndpointError: an endpoint refused the requests themselves, or nothing answers at it.
        PretrainedWeightsUnavailable: the CoCa captioner's weights are not available here.
    """
    cache = ResponseCache(config.cache_dir)
    captioner = _Captioner(config, cache)
    failures: dict[str, str] = {}
    hashes: dict[str, str] = {}
    first_path: dict[str, Path] = {}  # identical files are captioned once
    for name, path in images.items():
        try:
            hashes[name] = _file_hash(Path(path))
        except OSError as error:
            failures[f"image {name}"] = f"unreadable image ({type(error).__name__}: {error})"
            continue
        first_path.setdefault(hashes[name], Path(path))
    workers = 1 if config.captioner == "coca" else config.concurrency
    jobs = {digest: (lambda digest=digest: captioner(first_path[digest], digest)) for digest in first_path}
    by_hash = _run_all(jobs, workers, "cvsi captions", progress)
    captions: dict[str, list[str]] = {}
    for name in images:
        result = by_hash.get(hashes.get(name, ""), [])
        if isinstance(result, _ItemFailed):
            failures[f"image {name}"] = str(result)
        captions[name] = [] if isinstance(result, _ItemFailed) else list(result)
    _warn("image captionings", failures, len(images))

    editor = _Stage(EDIT_STAGE, config.editor_endpoint, config.editor_model, config, cache)
    edit_failures: dict[str, str] = {}
    requests: dict[str, tuple[list[str], str]] = {}  # one request per distinct (captions, text)
    request_of: dict[str, str] = {}
    for query_id, reference, text in queries:
        if not captions.get(reference):
            why = "reference image not given" if reference not in captions else "its reference has no captions"
            edit_failures[f"query {query_id}"] = why
            continue
        modification = " ".join(text.split())
        key = json.dumps([captions[reference], modification])
        requests[key] = (captions[reference], modification)
        request_of[query_id] = key

    def edit(key: str) -> CaptionEdit:
        reference_captions, modification = requests[key]
        schema = edit_schema(len(reference_captions))
        answer = editor.ask(_edit_messages(reference_captions, modification), [], schema)
        return CaptionEdit([c.strip() for c in answer["captions"]], [a.strip() for a in answer["added"]])

    answers = _run_all(
        {key: (lambda key=key: edit(key)) for key in requests}, config.concurrency, "cvsi edits", progress
    )
    edits: dict[str, CaptionEdit] = {}
    for query_id, reference, _ in queries:
        answer = answers.get(request_of.get(query_id, ""))
        if isinstance(answer, _ItemFailed):
            edit_failures[f"query {query_id}"] = str(answer)
        if isinstance(answer, CaptionEdit):
            edits[query_id] = CaptionEdit(list(answer.captions), list(answer.added))
        else:
            edits[query_id] = CaptionEdit(list(captions.get(reference, [])), [])
    _warn("query edits", edit_failures, len(queries))
    return CVSITexts(captions, edits, captioner.calls + editor.calls, {**failures, **edit_failures})
