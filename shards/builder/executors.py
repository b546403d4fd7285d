"""Who does a shard build's parallel work: parsing caption chunks and writing shards.

`build_shards` plans on the driver and hands the work to an executor; every executor runs the same two functions
(`run_parse_job`, `write_shard`) on the same inputs, so the bytes built do not depend on which one ran them or on
how many workers it had. `LocalExecutor` works in this process (0 workers) or in a process pool on this machine;
the Ray one, for a cluster, is `cluster.jobs.shard_build.RayBuildExecutor`.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Iterator, Sequence
from typing import Protocol

from shards.builder.noun_phrases import Extraction
from shards.builder.parse_cache import ParseJob, run_parse_job
from shards.builder.writer import ShardResult, ShardTask, write_shard


class BuildExecutor(Protocol):
    """Runs a build's jobs and yields each result as it is done, in any order; a parse result comes with the
    seconds the worker spent on it."""

    def parse(self, jobs: Sequence[ParseJob]) -> Iterator[tuple[ParseJob, Extraction, float]]: ...

    def write(self, tasks: Sequence[ShardTask]) -> Iterator[ShardResult]: ...


def _parse_timed(job: ParseJob) -> tuple[ParseJob, Extraction, float]:
    started = time.perf_counter()
    extraction = run_parse_job(job)
    return job, extraction, time.perf_counter() - started


class LocalExecutor:
    """This process (`workers` 0 or 1) or a pool of `workers` processes on this machine."""

    def __init__(self, workers: int) -> None:
        self.workers = workers

    def _map(self, function, items: Sequence) -> Iterator:
        if self.workers <= 1 or len(items) <= 1:
            yield from map(function, items)
            return
        # fork: workers inherit the loaded tokenizer and modules instead of re-importing torch per process.
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        with multiprocessing.get_context(method).Pool(min(self.workers, len(items))) as pool:
            yield from pool.imap_unordered(function, items)

    def parse(self, jobs: Sequence[ParseJob]) -> Iterator[tuple[ParseJob, Extraction, float]]:
        return self._map(_parse_timed, jobs)

    def write(self, tasks: Sequence[ShardTask]) -> Iterator[ShardResult]:
        return self._map(write_shard, tasks)
