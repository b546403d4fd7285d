"""One `launch/generate.py` run: find the pairs, check the endpoint, map the pairs on Ray Data with a progress bar,
then write the outputs and the summary.

The endpoint is checked on the driver before Ray starts, twice: `<endpoint>/models` (the URL and the key), then
one tiny chat completion (the key and the model as completions see them: some servers list their models to anyone).
A refusal ends the run there as one `generate error:` line; found later, inside a Ray Data actor, it would come
after Ray's own error lines."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from cluster.root_config import RootConfig
from shards.generate.config import GenerateConfig
from shards.generate.pairs import Pair, PairResult

CHECK_TIMEOUT_S = 30.0
"""Total deadline of each pre-flight request to the endpoint."""
CHECK_MAX_BYTES = 1024 * 1024
"""Longest `/models` answer read: the check needs only its status."""


class GenerateError(RuntimeError):
    """A run that cannot start or go on: no pairs, an unreachable or refusing endpoint; the message says why."""


@dataclass
class GenerateJob:
    config: RootConfig
    pairs: list[Pair]
    out: Path
    cache_dir: Path
    image_root: Path


def _pairs(config: RootConfig) -> list[Pair]:
    from shards.builder.sources import SourceError
    from shards.generate.records import read_pair_list, source_pairs

    generate = config.generate
    try:
        if generate.pairs:
            return read_pair_list(generate.pairs)
        if generate.source:
            sources = {source.name: source for source in config.data.sources}
            if generate.source not in sources:
                raise GenerateError(f"generate.source={generate.source!r} is not in data.sources ({sorted(sources)})")
            return source_pairs(sources[generate.source])
    except SourceError as error:
        raise GenerateError(str(error)) from None
    if generate.mine.index:
        from training.retrieval.gallery_index import GalleryIndexError
        from training.retrieval.mining import mine_pairs

        try:
            return [pair for pair, _ in mine_pairs(generate.mine)]
        except GalleryIndexError as error:
            raise GenerateError(f"generate.mine.index: {error}") from None
    raise GenerateError("no pairs: set generate.pairs, generate.source or generate.mine.index")


def prepare(config: RootConfig) -> GenerateJob:
    """The run's pairs and places, once the endpoint answers; raises GenerateError otherwise."""
    generate = config.generate
    pairs = _pairs(config)
    if generate.limit:
        pairs = pairs[: generate.limit]
    if not pairs:
        raise GenerateError("no image pairs to describe")
    out = Path(generate.out).resolve()
    image_root = Path(generate.image_root).resolve() if generate.image_root else _common_root(pairs)
    cache_dir = Path(generate.cache_dir).resolve() if generate.cache_dir else out / "cache"
    api_key = os.environ.get(generate.api_key_env) or None
    check_endpoint(generate.endpoint, api_key)
    check_completions(generate, api_key)
    return GenerateJob(config, pairs, out, cache_dir, image_root)


def _common_root(pairs: list[Pair]) -> Path:
    return Path(os.path.commonpath([path for pair in pairs for path in (pair.reference, pair.target)])).parent


def without_credentials(url: str) -> str:
    """`url` without a `user:password@` part, for records and messages."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def check_endpoint(endpoint: str, api_key: str | None) -> None:
    """Ask `<endpoint>/models` once, so that a wrong URL or key stops the run before any pair is sent."""
    import http.client

    from shards.generate import bounded_http

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    shown = without_credentials(endpoint)
    try:  # bounded like every other request: a trickling server cannot hold the driver here either
        reply = bounded_http.request(
            "GET", endpoint.rstrip("/") + "/models", None, headers, CHECK_TIMEOUT_S, CHECK_MAX_BYTES
        )
        status = reply.status
    except bounded_http.ResponseTooLarge as error:
        status = error.status  # a long model list is still an answer
    except (OSError, http.client.HTTPException) as error:
        raise GenerateError(f"generate.endpoint={shown} cannot be reached ({type(error).__name__})") from None
    if status in (401, 403):
        raise GenerateError(f"generate.endpoint={shown} refused the API key (http {status})")
    if status == 404:
        raise GenerateError(f"generate.endpoint={shown} has no /models: not an OpenAI-compatible base URL (try .../v1)")


def check_completions(generate: GenerateConfig, api_key: str | None) -> None:
    """Send one chat completion of one token, so that a key or model that completions refuse (401, 403, 404) stops
    the run here, in one line, before Ray Data starts. Any other failure is left to the pairs' own retries and
    failure counts: a busy endpoint, or one that insists on images, must not block a run that would work.
    """
    from shards.generate.client import ChatClient, EndpointError, EndpointRefused

    client = ChatClient(
        generate.endpoint,
        generate.model,
        api_key,
        timeout_s=min(generate.timeout_s, CHECK_TIMEOUT_S),
        max_retries=0,
        max_tokens=1,
        max_response_bytes=generate.max_response_bytes,
    )
    try:
        client.complete([{"role": "user", "content": "Reply with OK."}])
    except EndpointRefused as error:
        raise GenerateError(
            f"generate.endpoint={without_credentials(generate.endpoint)} refused a chat completion ({error.reason}): "
            f"check the API key in ${generate.api_key_env} and generate.model={generate.model!r}"
        ) from None
    except EndpointError:
        pass


def run(job: GenerateJob) -> dict[str, Any]:
    """Generate, write every output, and return the summary (also written as `summary_<split>.json`)."""
    from tqdm import tqdm

    from cluster.jobs.generation_pool import generate_on_ray, refusal
    from cluster.runtime.ray_setup import connect
    from shards.generate.records import summarize, write_json_atomically, write_outputs

    generate = job.config.generate
    started = time.monotonic()
    connect(job.config.cluster)
    bar = tqdm(total=len(job.pairs), desc="generating", unit="pair")
    failed = calls = 0

    def on_result(result: PairResult) -> None:
        nonlocal failed, calls
        failed += bool(result.failure)
        calls += result.calls
        bar.set_postfix(failed=failed, calls=calls, refresh=False)
        bar.update()

    try:
        results = generate_on_ray(generate, job.pairs, job.cache_dir, on_result)
    except Exception as error:
        refused = refusal(error)
        if refused is None:
            raise
        raise GenerateError(f"the endpoint refused a request: {refused}") from None
    finally:
        bar.close()
    trees = None
    if generate.trees == "synthetic":
        from shards.synthetic.tree_maker import synthetic_tree

        captions = {caption for result in results for caption in result.captions}
        trees = {caption: tree for caption in captions if (tree := synthetic_tree(caption)) is not None}
    paths = write_outputs(results, job.out, generate.split, job.image_root, trees)
    summary = summarize(results, (generate.price_prompt_per_million, generate.price_completion_per_million))
    summary.update(
        split=generate.split,
        endpoint=without_credentials(generate.endpoint),
        model=generate.model,
        prompt_version=results[0].prompt_version if results else None,
        wall_s=round(time.monotonic() - started, 1),
        image_root=str(job.image_root),
        outputs={name: str(path) for name, path in paths.items()},
    )
    write_json_atomically(job.out / f"summary_{generate.split}.json", summary)
    return summary
