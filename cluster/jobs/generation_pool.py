"""The data generator on Ray Data: a pool of `generate.concurrency` actors, each with its own endpoint client and
one request in flight, maps image pairs to results (`shards.generate.pairs.PairRunner`).

The pool size is the bound on concurrent requests to the endpoint, and each actor starts at most its share of
`generate.requests_per_second`. Every answer goes to the shared response cache as it arrives, so a run killed
halfway and started again asks only what it had not asked yet; results are sorted by pair id before anything is
written, so the worker count never changes the output.

The API key is read by each actor from its own environment (`generate.api_key_env`): it never passes through
Ray's object store, task arguments or runtime env, where it could be logged or spilled to disk.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from cluster.runtime.ray_setup import quiet_ray_data
from shards.generate.config import GenerateConfig
from shards.generate.pairs import Pair, PairResult


class _PairActor:
    """A Ray Data actor: one client, the cache, the prompts; `for_config` binds the settings to a subclass."""

    config: GenerateConfig | None = None
    cache_dir = ""

    def __init__(self) -> None:
        from shards.generate.cache import ResponseCache
        from shards.generate.client import ChatClient
        from shards.generate.pairs import PairRunner
        from shards.generate.protocol import load_prompts

        config = self.config
        assert config is not None
        client = ChatClient(
            config.endpoint,
            config.model,
            os.environ.get(config.api_key_env) or None,
            timeout_s=config.timeout_s,
            max_retries=config.max_retries,
            backoff_s=config.backoff_s,
            requests_per_second=config.requests_per_second / config.concurrency,
            max_tokens=config.max_tokens,
            max_response_bytes=config.max_response_bytes,
        )
        self.runner = PairRunner(config, load_prompts(config.prompts), client, ResponseCache(self.cache_dir))

    @classmethod
    def for_config(cls, config: GenerateConfig, cache_dir: str) -> type:
        return type(cls.__name__, (cls,), {"config": config, "cache_dir": cache_dir})

    def __call__(self, row: dict) -> dict:
        result = self.runner.run(Pair(**json.loads(row["pair"])))
        return {"result": json.dumps(result.to_json())}


def generate_on_ray(
    config: GenerateConfig, pairs: list[Pair], cache_dir: Path, on_result: Callable[[PairResult], None] | None = None
) -> list[PairResult]:
    """Every pair's result (call after `cluster.runtime.ray_setup.connect`).

    Raises:
        shards.generate.client.EndpointRefused: the endpoint refused a request outright (key, URL or model); Ray
            reports it as the cause of its task error, which `refusal` finds.
    """
    import ray

    quiet_ray_data()
    if not pairs:
        return []
    rows = [{"pair": json.dumps(asdict(pair))} for pair in pairs]
    dataset = ray.data.from_items(rows, override_num_blocks=min(len(rows), 16 * config.concurrency)).map(
        _PairActor.for_config(config, str(cache_dir)),
        compute=ray.data.ActorPoolStrategy(size=min(config.concurrency, len(rows))),
        num_cpus=0,  # waiting on the endpoint, not computing: the pool size alone bounds the actors
    )
    results = []
    for row in dataset.iter_rows():
        payload = json.loads(row["result"])
        result = PairResult(**payload)
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


def refusal(error: BaseException) -> str | None:
    """The message of an `EndpointRefused` that ended a Ray Data run, or None when the error is something else."""
    from shards.generate.client import EndpointRefused

    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, EndpointRefused):
            return str(seen)
        cause = getattr(seen, "cause", None)
        seen = cause if isinstance(cause, BaseException) else seen.__cause__
    text = str(error)
    marker = "EndpointRefused: "
    return text.split(marker, 1)[1].splitlines()[0] if marker in text else None
