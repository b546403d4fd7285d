"""Building a gallery index: the plan, resumable embedding shards, the faiss index and the manifest, written last.

The layout, the inputs and the chunk encoder are `training.retrieval.gallery_index`; see its docstring.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from training.retrieval.config import IndexConfig
from training.retrieval.gallery_index import (
    INDEX_FORMAT,
    MANIFEST,
    PLAN,
    SHARDS,
    SKIPPED,
    VECTORS,
    ChunkEncoder,
    ChunkResult,
    GalleryIndexError,
    GalleryItem,
    build_vector_index,
    items_digest,
    read_shards,
    shard_stem,
    write_faiss,
)


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _write_json(path: Path, value: Any) -> None:
    _atomic_write(path, lambda target: target.write_text(json.dumps(value, indent=1) + "\n"))


@dataclass
class BuildReport:
    count: int
    skipped: int
    shards_total: int
    shards_reused: int
    seconds: float
    index_seconds: float


def build_index(
    out: str | Path,
    items: Sequence[GalleryItem],
    bundle_hash: str,
    embed_dim: int,
    config: IndexConfig,
    encoder: ChunkEncoder,
    overwrite: bool = False,
    bundle_dir: str | Path | None = None,
) -> BuildReport:
    """Embed `items` into `out` shard by shard (resuming a matching build) and build the vector index.

    Raises:
        GalleryIndexError: `out` holds a different build (another bundle, input list or shard size) and not `overwrite`.
    """
    started = time.perf_counter()
    out = Path(out)
    shard_dir = out / SHARDS
    plan = {
        "format": INDEX_FORMAT,
        "bundle_sha256": bundle_hash,
        "items_sha256": items_digest(items),
        "count": len(items),
        "shard_size": config.shard_size,
        "batch_size": config.batch_size,
    }
    _prepare(out, plan, overwrite)
    shard_dir.mkdir(parents=True, exist_ok=True)
    shards = [items[start : start + config.shard_size] for start in range(0, len(items), config.shard_size)]
    pending = [index for index in range(len(shards)) if not (shard_dir / f"{shard_stem(index)}.json").is_file()]
    todo = sum(len(shards[index]) for index in pending)
    with tqdm(total=todo, desc="indexing", unit="img", dynamic_ncols=True, disable=todo == 0) as progress:
        for shard_index in pending:
            shard = shards[shard_index]
            chunks = [shard[start : start + config.batch_size] for start in range(0, len(shard), config.batch_size)]
            results = []
            for result in encoder(chunks):
                results.append(result)
                progress.update(len(result.ids) + len(result.skipped))
            _write_shard(shard_dir, shard_index, results, embed_dim)
    encoded = time.perf_counter()
    extra = {"bundle": str(Path(bundle_dir).resolve())} if bundle_dir is not None else {}
    count, skipped = _finish(out, len(shards), {**plan, **extra}, config, embed_dim)
    return BuildReport(
        count=count,
        skipped=skipped,
        shards_total=len(shards),
        shards_reused=len(shards) - len(pending),
        seconds=time.perf_counter() - started,
        index_seconds=time.perf_counter() - encoded,
    )


def _prepare(out: Path, plan: dict[str, Any], overwrite: bool) -> None:
    plan_file = out / PLAN
    if plan_file.is_file():
        previous = json.loads(plan_file.read_text())
        if previous == plan:
            (out / MANIFEST).unlink(missing_ok=True)  # rebuilt at the end; the shards are kept
            return
        if not overwrite:
            differs = sorted(key for key in plan if previous.get(key) != plan[key])
            raise GalleryIndexError(
                f"{out} holds another build (differs in {', '.join(differs)}); pass --overwrite or choose another --out"
            )
    elif out.exists() and any(out.iterdir()):
        # --overwrite only ever replaces an index build: never a folder of the user's own files.
        raise GalleryIndexError(f"{out} exists and is not an index build; choose another --out")
    if out.exists() and overwrite:
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(plan_file, plan)


def _write_shard(shard_dir: Path, shard_index: int, results: Sequence[ChunkResult], embed_dim: int) -> None:
    stem = shard_stem(shard_index)
    parts = [result.embeddings for result in results if len(result.ids)]
    embeddings = np.concatenate(parts) if parts else np.zeros((0, embed_dim), dtype=np.float32)
    _atomic_write(shard_dir / f"{stem}.npy", lambda target: _save_npy(target, embeddings))
    listing = {
        "ids": [image_id for result in results for image_id in result.ids],
        "paths": [path for result in results for path in result.paths],
        "skipped": [entry for result in results for entry in result.skipped],
    }
    _write_json(shard_dir / f"{stem}.json", listing)  # last: marks the shard finished


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as handle:
        np.save(handle, np.ascontiguousarray(array, dtype=np.float32))


def _finish(out: Path, shards: int, plan: dict[str, Any], config: IndexConfig, embed_dim: int) -> tuple[int, int]:
    ids, _, embeddings, skipped = read_shards(out, shards)
    _atomic_write(
        out / SKIPPED, lambda target: target.write_text("".join(json.dumps(entry) + "\n" for entry in skipped))
    )
    if not ids:
        raise GalleryIndexError(f"none of the {plan['count']} images could be read; see {out / SKIPPED}")
    vectors, params = build_vector_index(embeddings, config)
    _atomic_write(out / VECTORS, lambda target: write_faiss(vectors, target))
    manifest = {
        **plan,
        "dim": embed_dim,
        "indexed": len(ids),
        "skipped": len(skipped),
        "shards": shards,
        "index": params,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    _write_json(out / MANIFEST, manifest)
    return len(ids), len(skipped)
