"""Building a shard set: sources -> mixture -> noun phrases -> seeded shard plan -> tar shards in parallel -> index.

The driver reads the sources and plans; an executor (`shards.builder.executors`: this process, a process pool, or
Ray across a cluster, with Ray Data parser actors and one Ray task per shard) parses the caption chunks and writes
the shards. The plan (which triplet goes into which shard, in which order) depends only on the config and the raw
data, so the same seed gives the same bytes whoever wrote them. Parsed chunks are cached as they come back
(`shards.builder.parse_cache`); a re-run parses only the chunks it lacks, reuses every shard whose sidecar matches
its plan and whose bytes still hash right, and rebuilds the rest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from shards.builder.executors import BuildExecutor, LocalExecutor
from shards.builder.noun_phrases import Extraction
from shards.builder.parse_cache import ParseJob, plan_parse, save_chunk
from shards.builder.publish import default_staging_dir, publish
from shards.builder.sources import SourceError, Triplet, mixture, read_source
from shards.builder.tokens import TRUNCATED
from shards.builder.writer import SampleSpec, ShardResult, ShardTask, complete_result
from shards.config import DataConfig
from shards.format import INDEX_NAME, SCHEMA_VERSION, ShardEntry, ShardIndex, shard_name
from shards.model_inputs import CONTEXT_LENGTH, tokenizer_name
from shards.storage import ShardStore

logger = logging.getLogger(__name__)

_SHARD_FILE = re.compile(r"^shard-(\d{6})\.tar(\.done\.json|\.tmp)?$")


@dataclass
class BuildReport:
    """Outcome of a build: the index written and per-source statistics."""

    index_path: Path | str
    """Where `index.json` was written: a path, or a URL for a shard set built to object storage."""
    samples: int
    shards: int
    rebuilt: int
    """Shards written by this run (the others were complete already)."""
    sources: dict[str, dict]
    parsed: int = 0
    """Captions parsed by this run (the others came from the noun-phrase cache)."""
    phases: dict[str, float] = field(default_factory=dict)
    """Wall seconds of each phase on the driver: `read` (sources and mixture), `parse`, `plan`, `write`, `index`,
    `upload`; `first_shard` is the time from the start until the first shard was written."""
    timings: dict[str, float] = field(default_factory=dict)
    """Worker seconds per stage, summed over workers: `parse`, `images`, `tokenize`, `tar`, `hash`."""

    @property
    def skipped(self) -> int:
        return sum(stats["skipped"] for stats in self.sources.values())

    def summary(self) -> str:
        """`built N samples in S shards; skipped K (source: reason=count ...)`."""
        parts = [
            f"{name}: " + " ".join(f"{reason}={count}" for reason, count in sorted(stats["skip_reasons"].items()))
            for name, stats in self.sources.items()
            if stats["skipped"]
        ]
        detail = f" ({'; '.join(parts)})" if parts else ""
        return f"built {self.samples} samples in {self.shards} shards; skipped {self.skipped}{detail}"


def _fingerprint(payload: object) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=True).encode("utf-8")).hexdigest()


def _noun_phrases(
    data: DataConfig,
    triplets: dict[str, list[Triplet]],
    shards_dir: Path,
    executor: BuildExecutor,
    progress: bool,
    timings: dict[str, float],
) -> tuple[dict[str, Extraction], int]:
    """Noun phrases of every source's captions: cached chunks loaded, the others parsed by `executor`, each saved
    the moment it comes back. Returns them with the number of captions parsed by this run."""
    extractions: dict[str, Extraction] = {}
    jobs: list[ParseJob] = []
    for source in data.sources:
        captions = (triplet.caption for triplet in triplets[source.name])
        extractions[source.name], source_jobs = plan_parse(source, data.noun_phrases, captions, shards_dir)
        jobs.extend(source_jobs)
    parsed = sum(len(job.captions) for job in jobs)
    if jobs:
        logger.info("parsing %d captions in %d chunks", parsed, len(jobs))
    with tqdm(total=parsed, unit="caption", desc="parsing captions", disable=not (progress and jobs)) as bar:
        for job, extraction, seconds in executor.parse(jobs):
            save_chunk(job, extraction)
            extractions[job.source].noun_phrases.update(extraction.noun_phrases)
            extractions[job.source].skipped.update(extraction.skipped)
            timings["parse"] = timings.get("parse", 0.0) + seconds
            bar.update(len(job.captions))
    return extractions, parsed


def _plan(
    data: DataConfig,
    backbone: str,
    shards_dir: Path,
    executor: BuildExecutor,
    progress: bool,
    phases: dict[str, float],
    timings: dict[str, float],
) -> tuple[list[ShardTask], dict[str, dict], int]:
    """Read the sources, sample the mixture, find noun phrases and split the samples into shard tasks."""
    if not data.sources:
        raise SourceError("data.sources is empty: nothing to build")
    started = time.perf_counter()
    triplets = {source.name: read_source(source) for source in data.sources}
    items = mixture(data.sources, triplets, data.seed)
    stats: dict[str, dict] = {
        source.name: {
            "kind": source.kind,
            "weight": source.weight,
            "read": len(triplets[source.name]),
            "taken": 0,
            "skip_reasons": Counter(),
        }
        for source in data.sources
    }
    phases["read"] = time.perf_counter() - started
    started = time.perf_counter()
    extractions, parsed = _noun_phrases(data, triplets, shards_dir, executor, progress, timings)
    phases["parse"] = time.perf_counter() - started
    started = time.perf_counter()
    specs: list[SampleSpec] = []
    shared_phrases: dict[str, list[tuple[str, int, int]]] = {}
    for item in items:
        triplet: Triplet = item.triplet
        source_stats = stats[triplet.source]
        source_stats["taken"] += 1
        extraction = extractions[triplet.source]
        if triplet.reference_path is None or triplet.target_path is None:
            source_stats["skip_reasons"]["unknown_image_name"] += 1
            continue
        if triplet.caption in extraction.skipped:
            source_stats["skip_reasons"][extraction.skipped[triplet.caption]] += 1
            continue
        phrases = shared_phrases.get(triplet.caption)
        if phrases is None:  # one list per caption, shared by its samples: a 1M-triplet plan stays small
            phrases = [(p.text, p.start, p.end) for p in extraction.noun_phrases[triplet.caption]]
            shared_phrases[triplet.caption] = phrases
        specs.append(
            SampleSpec(
                key=item.key,
                id=triplet.id,
                source=triplet.source,
                copy=item.copy,
                caption=triplet.caption,
                reference_name=triplet.reference_name,
                target_name=triplet.target_name,
                reference_path=triplet.reference_path,
                target_path=triplet.target_path,
                noun_phrases=phrases,
                phrase_boxes=_first_boxes(triplet.phrase_boxes),
            )
        )
    del items, triplets, extractions, shared_phrases  # the specs hold what is still needed
    random.Random(data.seed).shuffle(specs)
    settings = {
        "schema_version": SCHEMA_VERSION,
        "tokenizer": tokenizer_name(backbone),
        "np_length": data.noun_phrases.np_length,
        "image_short_side": data.image_short_side,
        "jpeg_quality": data.jpeg_quality,
    }
    tasks = []
    for number, begin in enumerate(range(0, len(specs), data.samples_per_shard)):
        chunk = specs[begin : begin + data.samples_per_shard]
        task = ShardTask(
            number=number,
            path=str(shards_dir / shard_name(number)),
            samples=chunk,
            backbone=backbone,
            np_length=data.noun_phrases.np_length,
            image_short_side=data.image_short_side,
            jpeg_quality=data.jpeg_quality,
        )
        task.fingerprint = _fingerprint({"settings": settings, "samples": [_hashed(spec) for spec in chunk]})
        tasks.append(task)
    phases["plan"] = time.perf_counter() - started
    return tasks, stats, parsed


_SPEC_FIELDS = tuple(spec_field.name for spec_field in dataclasses.fields(SampleSpec))
_NO_BOXES: dict[str, list[float]] = {}
"""Shared by every sample without boxes (never mutated)."""


def _hashed(spec: SampleSpec) -> dict:
    """What of a sample the shard fingerprint covers: every field, `phrase_boxes` only when there are any (shards
    built before sources could carry boxes keep their fingerprints)."""
    fields = {name: getattr(spec, name) for name in _SPEC_FIELDS}  # dataclasses.asdict's deep copy is 10x slower
    if not fields["phrase_boxes"]:
        del fields["phrase_boxes"]
    return fields


def _first_boxes(pairs) -> dict[str, list[float]]:
    """NP text -> box; the first box of a text wins, as the first occurrence of an NP is the one kept."""
    if not pairs:
        return _NO_BOXES
    boxes: dict[str, list[float]] = {}
    for text, box in pairs:
        boxes.setdefault(text, list(box))
    return boxes


def _remove_stale(shards_dir: Path, count: int) -> None:
    """Remove shard files of an earlier, larger plan and temporaries of an interrupted run."""
    for path in shards_dir.iterdir():
        match = _SHARD_FILE.match(path.name)
        if match and (int(match.group(1)) >= count or match.group(2) == ".tmp"):
            logger.info("removing stale %s", path)
            path.unlink()


def default_executor(data: DataConfig) -> BuildExecutor:
    """In this process (`build_workers` 0) or a process pool; a Ray build passes its own executor."""
    workers = data.build_workers if data.build_workers >= 0 else (os.cpu_count() or 1)
    return LocalExecutor(workers)


def build_shards(
    data: DataConfig, backbone: str, progress: bool = True, executor: BuildExecutor | None = None
) -> BuildReport:
    """Build (or finish building) the shard set of `data` for `backbone`'s tokenizer, then write `index.json`.

    Args:
        data: the config's `data` section (sources, shard settings, noun-phrase settings, seed).
        backbone: `model.backbone`; its open_clip tokenizer makes the ids and is recorded in the index.
        progress: show tqdm bars.
        executor: who parses and writes; `default_executor(data)` when None. The bytes do not depend on it.

    Raises:
        SourceError: an annotation file is missing or malformed.
        NounPhraseError: the noun-phrase parser cannot run (stanza models or tree sidecar missing).
        ShardStorageError: a URL `data.shards_dir` refused the upload or stayed unreachable.
    """
    executor = executor if executor is not None else default_executor(data)
    store = ShardStore(data.shards_dir, dict(data.storage_options), retries=data.read_retries)
    if store.remote:
        staging = Path(data.staging_dir).expanduser() if data.staging_dir else default_staging_dir(data.shards_dir)
        logger.info("building %s in %s, then uploading", data.shards_dir, staging)
        report = build_shards(dataclasses.replace(data, shards_dir=str(staging)), backbone, progress, executor)
        started = time.perf_counter()
        uploaded, kept = publish(staging, store, progress)
        report.phases["upload"] = time.perf_counter() - started
        logger.info("uploaded %d shards, %d were there already", uploaded, kept)
        return dataclasses.replace(report, index_path=store.where(INDEX_NAME))
    began = time.perf_counter()
    shards_dir = Path(data.shards_dir)
    shards_dir.mkdir(parents=True, exist_ok=True)
    phases: dict[str, float] = {}
    timings: dict[str, float] = {}
    tasks, stats, parsed = _plan(data, backbone, shards_dir, executor, progress, phases, timings)
    _remove_stale(shards_dir, len(tasks))
    results: dict[int, ShardResult] = {}
    pending = []
    for task in tasks:
        result = complete_result(task)
        if result is None:
            pending.append(task)
        else:
            results[task.number] = result
    if results:
        logger.info("%d of %d shards are complete already", len(results), len(tasks))
    total = sum(len(task.samples) for task in tasks)
    done = total - sum(len(task.samples) for task in pending)
    numbers = {Path(task.path).name: task.number for task in tasks}
    sizes = {Path(task.path).name: len(task.samples) for task in tasks}
    started = time.perf_counter()
    with tqdm(total=total, initial=done, unit="triplet", desc="building shards", disable=not progress) as bar:
        for result in executor.write(pending):
            if "first_shard" not in phases:
                phases["first_shard"] = time.perf_counter() - began
            results[numbers[result.name]] = result
            for stage, seconds in result.timings.items():
                timings[stage] = timings.get(stage, 0.0) + seconds
            bar.update(sizes[result.name])
    phases["write"] = time.perf_counter() - started
    started = time.perf_counter()
    ordered = [results[number] for number in sorted(results)]
    for source_stats in stats.values():
        source_stats.update(samples=0, noun_phrases=0, truncated_nps=0, dropped_nps=Counter())
    for result in ordered:
        for source, reasons in result.skipped.items():
            stats[source]["skip_reasons"].update(reasons)
        for source, reasons in result.dropped_nps.items():
            stats[source]["dropped_nps"].update(reasons)
        for source, kept in result.kept_nps.items():
            stats[source]["noun_phrases"] += kept
    for source_stats in stats.values():
        source_stats["skip_reasons"] = dict(sorted(source_stats["skip_reasons"].items()))
        source_stats["skipped"] = sum(source_stats["skip_reasons"].values())
        source_stats["samples"] = source_stats["taken"] - source_stats["skipped"]
        source_stats["truncated_nps"] = source_stats["dropped_nps"].get(TRUNCATED, 0)
        source_stats["dropped_nps"] = dict(sorted(source_stats["dropped_nps"].items()))
    index = ShardIndex(
        tokenizer=tokenizer_name(backbone),
        context_length=CONTEXT_LENGTH,
        noun_phrases={
            "parser": data.noun_phrases.parser,
            "max_nps": data.noun_phrases.max_nps,
            "selection": data.noun_phrases.selection,
            "np_length": data.noun_phrases.np_length,
        },
        image_short_side=data.image_short_side,
        seed=data.seed,
        # A shard whose every triplet was skipped stays on disk (it is complete) but is not worth streaming.
        shards=[ShardEntry(result.name, result.count, result.sha256) for result in ordered if result.count],
        sources=stats,
    )
    written = sum(result.count for result in ordered)
    if written != sum(s["samples"] for s in stats.values()):
        raise RuntimeError(f"shard counts ({written}) disagree with the source statistics; rebuild {shards_dir}")
    index_path = index.save(shards_dir)
    phases["index"] = time.perf_counter() - started
    return BuildReport(index_path, written, len(index.shards), len(pending), stats, parsed, phases, timings)
