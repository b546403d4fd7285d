"""The shard build at scale: the same bytes on every path (in process, a process pool, Ray Data with 1 and 2
workers), a build SIGKILLed mid-parse and mid-write that finishes on rerun equal to an uninterrupted one without
parsing or rewriting what it had done, and the reader's epoch plan for a 26M-triplet index in bounded time and
memory."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import tracemalloc
from pathlib import Path

import pytest
from raw_dataset_fixtures import write_cirr

from shards.builder.shard_set import build_shards
from shards.config import DataConfig, NounPhraseConfig, SourceConfig
from shards.format import FIELDS, file_sha256
from shards.model_inputs import TINY_BACKBONE
from shards.stream.plan import StreamPlan

REPO_ROOT = Path(__file__).resolve().parents[2]
TRIPLETS = 60
CAPTIONS = 20  # the fixture's captions repeat: 20 unique, parsed in 10 chunks of 2
KILLED = -9


def _data(root: Path, shards: Path, workers: int = 0, build_on: str = "processes") -> DataConfig:
    return DataConfig(
        sources=[SourceConfig(name="cirr", kind="cirr", path=str(root), trees=str(root / "trees.jsonl"))],
        shards_dir=str(shards),
        samples_per_shard=6,
        image_short_side=12,
        build_workers=workers,
        build_on=build_on,
        noun_phrases=NounPhraseConfig(parser="trees", chunk_size=2),
    )


def _config_file(tmp_path: Path, root: Path, shards: Path, workers: int, build_on: str) -> Path:
    config = tmp_path / f"build-{shards.name}.yaml"
    config.write_text(
        textwrap.dedent(
            f"""
            model:
              backbone: {TINY_BACKBONE}
            data:
              sources:
                - name: cirr
                  kind: cirr
                  path: {root}
                  trees: {root / "trees.jsonl"}
              shards_dir: {shards}
              samples_per_shard: 6
              image_short_side: 12
              build_workers: {workers}
              build_on: {build_on}
              noun_phrases:
                parser: trees
                chunk_size: 2
            """
        )
    )
    return config


def _digests(shards: Path) -> dict[str, str]:
    """index.json and every shard by sha256: what 'the same shard set' means."""
    paths = [shards / "index.json", *sorted(shards.glob("shard-*.tar"))]
    return {path.name: file_sha256(path) for path in paths}


def _launch(config: Path, prelude: str = "", timeout: float = 300) -> subprocess.CompletedProcess:
    """`launch/build_shards.py --config config` in a fresh interpreter, after `prelude` (which may arm a kill)."""
    script = f"{prelude}\nfrom launch import build_shards\nraise SystemExit(build_shards.main(['--config', {str(config)!r}]))"
    env = os.environ | {"PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("raw") / "cirr_root"
    write_cirr(root, TRIPLETS)
    return root


@pytest.fixture(scope="module")
def reference(raw, tmp_path_factory) -> dict[str, str]:
    """The set built in process, uninterrupted: what every other path must equal."""
    shards = tmp_path_factory.mktemp("reference") / "shards"
    report = build_shards(_data(raw, shards), TINY_BACKBONE, progress=False)
    assert report.samples == TRIPLETS and report.shards == 10 and report.parsed == CAPTIONS
    return _digests(shards)


def test_a_process_pool_builds_the_same_bytes(raw, reference, tmp_path):
    shards = tmp_path / "pool"
    build_shards(_data(raw, shards, workers=2), TINY_BACKBONE, progress=False)
    assert _digests(shards) == reference


@pytest.mark.slow
def test_ray_data_with_one_and_two_workers_builds_the_same_bytes(raw, reference, tmp_path):
    """Both Ray builds through the launcher, as users launch it, in one private local Ray on 127.0.0.1."""
    one, two = tmp_path / "ray1", tmp_path / "ray2"
    first, second = (_config_file(tmp_path, raw, path, workers, "ray") for path, workers in ((one, 1), (two, 2)))
    result = _launch(
        first, f"from launch import build_shards\nassert build_shards.main(['--config', {str(second)!r}]) == 0"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "started a local Ray on 127.0.0.1" in result.stdout
    assert "building on Ray with 2 workers" in result.stdout and "building on Ray with 1 workers" in result.stdout
    assert result.stdout.count("10 shards written by this run, 20 captions parsed") == 2
    assert _digests(one) == reference and _digests(two) == reference


def _chunk_files(shards: Path) -> dict[str, int]:
    return {path.name: path.stat().st_mtime_ns for path in (shards / "noun_phrases").rglob("chunk-*.json")}


# Armed in the child before the build: a real SIGKILL at a chosen point, so nothing gets to clean up.
KILL_AFTER_CHUNKS = """
import os, signal
from shards.builder import shard_set
saved = shard_set.save_chunk
count = 0
def save_then_die(job, extraction):
    global count
    saved(job, extraction)
    count += 1
    if count == {n}:
        os.kill(os.getpid(), signal.SIGKILL)
shard_set.save_chunk = save_then_die
"""

KILL_INSIDE_A_SHARD = """
import os, signal, tarfile
add = tarfile.TarFile.addfile
count = 0
def add_then_die(self, *args, **kwargs):
    global count
    add(self, *args, **kwargs)
    count += 1
    if count == {n}:
        os.kill(os.getpid(), signal.SIGKILL)
tarfile.TarFile.addfile = add_then_die
"""


def test_a_build_killed_mid_parse_and_mid_write_resumes_to_the_same_bytes(raw, reference, tmp_path):
    shards = tmp_path / "killed"
    config = _config_file(tmp_path, raw, shards, workers=0, build_on="processes")

    killed = _launch(config, KILL_AFTER_CHUNKS.format(n=4))
    assert killed.returncode == KILLED, killed.stderr[-2000:]
    kept = _chunk_files(shards)
    assert len(kept) == 4 and not list(shards.glob("shard-*"))

    # Members per sample: 7 (shards.format.FIELDS); 6 samples per shard. Die inside the 4th shard.
    killed = _launch(config, KILL_INSIDE_A_SHARD.format(n=len(FIELDS) * (6 * 3 + 2) + 3))
    assert killed.returncode == KILLED, killed.stderr[-2000:]
    chunks = _chunk_files(shards)
    assert {name: chunks[name] for name in kept} == kept  # nothing parsed twice
    assert len(chunks) == 10  # all parsed before any shard is written
    complete = {path.name: path.stat() for path in shards.glob("shard-*.tar")}
    assert len(complete) == 3 and len(list(shards.glob("shard-*.tar.tmp"))) == 1

    finished = _launch(config)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert "7 shards written by this run, 0 captions parsed" in finished.stdout
    assert _chunk_files(shards) == chunks
    for name, before in complete.items():  # complete shards are not rewritten
        after = (shards / name).stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), name
    assert not list(shards.glob("*.tmp")) and _digests(shards) == reference


def test_the_epoch_plan_of_26m_triplets_over_4096_loader_slots_is_fast_and_small():
    """26,000 shards of 1,000 triplets, 512 ranks x 8 loader slots: no data, only the index's names and counts."""
    tracemalloc.start()
    started = time.perf_counter()
    plan = StreamPlan(tuple(f"shard-{number:06d}.tar" for number in range(26_000)), (1000,) * 26_000, 0, 512, 8, 32)
    pieces = [plan.slot_pieces(0, rank, slot) for rank in (0, 255, 511) for slot in (0, 7)]
    seconds = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert plan.steps_per_epoch == 26_000_000 // (512 * 32)
    assert all(pieces) and seconds < 10, seconds
    assert peak < 64 * 2**20, f"{peak / 2**20:.1f} MiB"
