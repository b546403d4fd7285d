"""The noun-phrase cache of a shard build, kept in chunks so that a killed build keeps what it had parsed.

A source's unique captions (in first-appearance order) are cut into chunks of `data.noun_phrases.chunk_size`.
Each chunk is parsed as one job, by whichever executor runs the build, and its result is written as one JSON file
the moment it comes back:

    <shards_dir>/noun_phrases/<source>-<settings digest>/chunk-<number>-<captions digest>.json

The folder name covers the parser settings (parser, max_nps, selection, the tree sidecar's sha256 or stanza's model
directory); the file name covers the chunk's captions. A rerun loads every chunk file that matches and parses only
the chunks that have none, so a build killed mid-parse loses at most the chunks in flight.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

from shards.builder.noun_phrases import (
    Extraction,
    NounPhrase,
    NounPhraseError,
    extract_from_trees,
    extract_with_stanza,
    read_tree_sidecar,
    stanza_model_dir,
)
from shards.config import NounPhraseConfig, SourceConfig
from shards.format import file_sha256, sanitize_key

logger = logging.getLogger(__name__)

CACHE_DIR = "noun_phrases"
_DIGEST_CHARS = 16


@dataclass(frozen=True)
class ParseJob:
    """One chunk of one source's captions to parse; plain data, so it travels to a worker process or Ray actor."""

    source: str
    number: int
    captions: tuple[str, ...]
    config: NounPhraseConfig
    trees: str | None
    """The source's tree sidecar (parser `trees`)."""
    path: str
    """The chunk file the driver writes the result to."""

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "captions": list(self.captions)})

    @classmethod
    def from_json(cls, text: str) -> ParseJob:
        fields = json.loads(text)
        return cls(**{**fields, "captions": tuple(fields["captions"]), "config": NounPhraseConfig(**fields["config"])})


def extraction_to_json(extraction: Extraction) -> str:
    return json.dumps(
        {
            "noun_phrases": {c: [[p.text, p.start, p.end] for p in ps] for c, ps in extraction.noun_phrases.items()},
            "skipped": extraction.skipped,
        },
        sort_keys=True,
    )


def extraction_from_json(text: str) -> Extraction:
    payload = json.loads(text)
    return Extraction(
        {c: [NounPhrase(*p) for p in ps] for c, ps in payload["noun_phrases"].items()}, dict(payload["skipped"])
    )


def _digest(payload: object) -> str:
    encoded = json.dumps(payload, sort_keys=True, ensure_ascii=True).encode("utf-8")
    return hashlib.sha256(encoded).hexdigest()[:_DIGEST_CHARS]


def parse_settings(source: SourceConfig, config: NounPhraseConfig) -> dict:
    """What a parse result depends on besides the caption.

    Raises:
        NounPhraseError: parser `trees` without a sidecar on the source, or with a sidecar that does not exist.
    """
    settings: dict = {"parser": config.parser, "max_nps": config.max_nps, "selection": config.selection}
    if config.parser == "trees":
        if not source.trees:
            raise NounPhraseError(
                f"source {source.name!r}: data.noun_phrases.parser=trees needs a `trees` sidecar on every source"
            )
        if not Path(source.trees).is_file():
            raise NounPhraseError(
                f"tree sidecar not found: {source.trees} (data.noun_phrases.parser=trees reads each source's "
                "`trees` file)"
            )
        settings["trees_sha256"] = file_sha256(source.trees)
    else:
        settings["stanza_dir"] = str(stanza_model_dir(config))
    return settings


def plan_parse(
    source: SourceConfig, config: NounPhraseConfig, captions: Iterable[str], shards_dir: Path
) -> tuple[Extraction, list[ParseJob]]:
    """The cached noun phrases of a source's captions, and the jobs that parse the chunks not cached yet.

    Chunk files of other settings, or of chunks this plan no longer has, are removed (they are a cache).
    """
    settings = parse_settings(source, config)
    name = sanitize_key(source.name)
    root = shards_dir / CACHE_DIR
    folder = root / f"{name}-{_digest(settings)}"
    folder.mkdir(parents=True, exist_ok=True)
    for other in root.glob(f"{name}-*"):
        if other != folder and other.is_dir() and other.name[: -(_DIGEST_CHARS + 1)] == name:
            logger.info("removing the noun-phrase cache of other settings %s", other)
            shutil.rmtree(other)
    unique = list(dict.fromkeys(captions))
    cached = Extraction({}, {})
    jobs: list[ParseJob] = []
    planned: set[str] = set()
    for number, begin in enumerate(range(0, len(unique), config.chunk_size)):
        chunk = tuple(unique[begin : begin + config.chunk_size])
        path = folder / f"chunk-{number:06d}-{_digest(chunk)}.json"
        planned.add(path.name)
        loaded = load_chunk(path, chunk)
        if loaded is None:
            jobs.append(ParseJob(source.name, number, chunk, config, source.trees, str(path)))
        else:
            cached.noun_phrases.update(loaded.noun_phrases)
            cached.skipped.update(loaded.skipped)
    for stale in folder.iterdir():
        if stale.name not in planned:
            stale.unlink()
    return cached, jobs


def load_chunk(path: Path, captions: Sequence[str]) -> Extraction | None:
    """The chunk file's result when it is readable and covers every caption of the chunk, else None."""
    if not path.is_file():
        return None
    try:
        extraction = extraction_from_json(path.read_text(encoding="utf-8"))
    except (ValueError, KeyError, TypeError):
        logger.warning("ignoring unreadable noun-phrase chunk %s", path)
        return None
    if any(c not in extraction.noun_phrases and c not in extraction.skipped for c in captions):
        return None
    return extraction


def save_chunk(job: ParseJob, extraction: Extraction | str) -> None:
    """Write a parsed chunk (temporary name, then rename): a killed build never leaves half a chunk.

    `extraction` may be its JSON already (`extraction_to_json`), as it arrives from a Ray actor."""
    text = extraction if isinstance(extraction, str) else extraction_to_json(extraction)
    path = Path(job.path)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


@lru_cache(maxsize=4)
def _sidecar(path: str, mtime_ns: int, size: int) -> dict[str, str]:
    return read_tree_sidecar(path)


def run_parse_job(job: ParseJob) -> Extraction:
    """Parse one chunk: the tree sidecar is read once per process (cached), stanza's pipeline loaded once.

    Raises:
        NounPhraseError: parser `trees` without a sidecar path or file, or parser `stanza` without its models.
    """
    if job.config.parser == "trees":
        if not job.trees:
            raise NounPhraseError("data.noun_phrases.parser=trees needs a `trees` sidecar on every source")
        try:
            stat = Path(job.trees).stat()
        except FileNotFoundError:
            raise NounPhraseError(f"tree sidecar {job.trees} does not exist (a source's `trees`)") from None
        trees = _sidecar(job.trees, stat.st_mtime_ns, stat.st_size)
        return extract_from_trees(job.captions, trees, job.config.max_nps, job.config.selection)
    return extract_with_stanza(job.captions, job.config)
