"""The shard build on Ray: caption chunks parsed by Ray Data parser actors, shards written by Ray tasks.

`shards.builder.shard_set.build_shards` plans on the driver and takes this executor for the parallel work. Each
parse row is one chunk of captions, mapped by an actor that loads its parser once (the tree sidecar, or stanza's
pipeline, on a GPU when the actor has one). Each shard is one Ray task running `write_shard` straight into the
build directory, with `workers` tasks in flight, so the driver never holds more than those plans as JSON. Both run
exactly the functions the local executor runs, so the bytes are the same. Jobs and results travel as JSON strings,
never as pickled objects.

Every worker must see the build directory (`data.shards_dir`, or `data.staging_dir` for a URL): on a cluster of
more than one node that is a shared filesystem.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict

from cluster.runtime.ray_setup import quiet_ray_data
from shards.builder.noun_phrases import Extraction, NounPhraseError
from shards.builder.parse_cache import ParseJob, extraction_from_json, extraction_to_json
from shards.builder.writer import ShardResult, ShardTask

# A worker's error travels back as this field of its row, so the driver can raise it as the library's own error
# (one line) instead of Ray's wrapped traceback.
_ERROR = "error"


class _ParserActor:
    """A Ray Data actor that parses caption chunks; its parser (sidecar or stanza pipeline) is loaded once."""

    def __call__(self, row: dict) -> dict:
        from shards.builder.parse_cache import run_parse_job

        job = ParseJob.from_json(row["job"])
        started = time.perf_counter()
        try:
            extraction = run_parse_job(job)
        except NounPhraseError as error:
            return {"index": row["index"], "result": "", "seconds": 0.0, _ERROR: str(error)}
        seconds = time.perf_counter() - started
        return {"index": row["index"], "result": extraction_to_json(extraction), "seconds": seconds, _ERROR: ""}


def _write_task(task: str) -> str:
    from shards.builder.writer import write_shard

    return json.dumps(asdict(write_shard(ShardTask.from_json(task))))


def cluster_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


class RayBuildExecutor:
    """Parse and write on Ray Data with `workers` parser actors and at most `workers` concurrent write tasks.

    Call after `cluster.runtime.ray_setup.connect`. `workers` -1 means one per CPU of the cluster.
    """

    def __init__(self, workers: int, stanza_on_gpu: bool = False) -> None:
        self.workers = cluster_cpus() if workers < 0 else max(1, workers)
        self.stanza_on_gpu = stanza_on_gpu
        quiet_ray_data()  # the build draws its own tqdm bars

    def parse(self, jobs: Sequence[ParseJob]) -> Iterator[tuple[ParseJob, Extraction, float]]:
        if not jobs:
            return
        import ray

        gpu = self.stanza_on_gpu and jobs[0].config.parser == "stanza" and jobs[0].config.use_gpu
        rows = [{"index": index, "job": job.to_json()} for index, job in enumerate(jobs)]
        dataset = ray.data.from_items(rows, override_num_blocks=len(rows)).map(
            _ParserActor,
            compute=ray.data.ActorPoolStrategy(size=min(self.workers, len(rows))),
            num_gpus=1 if gpu else 0,
            num_cpus=0 if gpu else 1,
        )
        for row in dataset.iter_rows():
            if row[_ERROR]:
                raise NounPhraseError(row[_ERROR])
            yield jobs[row["index"]], extraction_from_json(row["result"]), float(row["seconds"])

    def write(self, tasks: Sequence[ShardTask]) -> Iterator[ShardResult]:
        """One Ray task per shard, `workers` in flight: the driver holds the plans of those only, as JSON."""
        import ray

        # Idempotent (temporary name, then rename), so a task lost with its node is simply run again.
        write = ray.remote(num_cpus=1, max_retries=3)(_write_task)
        waiting = iter(tasks)
        in_flight: list = []

        def submit() -> None:
            task = next(waiting, None)
            if task is not None:
                in_flight.append(write.remote(task.to_json()))

        for _ in range(self.workers):
            submit()
        while in_flight:
            done, in_flight[:] = ray.wait(in_flight, num_returns=1)
            submit()
            yield ShardResult(**json.loads(ray.get(done[0])))


def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0
