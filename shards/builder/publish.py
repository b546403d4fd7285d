"""Building a shard set at a URL: build it in a local staging directory, then upload what the store lacks.

Readers trust `index.json`, so it goes up last: until then a reader sees the previous complete shard set or none.
A shard is uploaded before its sidecar, and an upload is skipped when the store's sidecar equals the staged one
(same fingerprint, same sha256), so an interrupted publish resumes where it stopped and a rebuild of an unchanged
set uploads nothing but the index.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

from tqdm import tqdm

from shards.format import INDEX_NAME, SIDECAR_SUFFIX, ShardIndex
from shards.storage import ShardStore

logger = logging.getLogger(__name__)

_PUBLISHED_FILE = re.compile(r"^shard-(\d{6})\.tar(\.done\.json)?$")


def default_staging_dir(url: str) -> Path:
    """`~/.cache/context-cir/staging/<host-and-path>-<hash>`: one per URL, kept between builds."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", url.split("://", 1)[-1]).strip("_")[:80]
    digest = hashlib.sha256(url.encode()).hexdigest()[:12]
    return Path.home() / ".cache" / "context-cir" / "staging" / f"{readable}-{digest}"


def publish(staging: Path, store: ShardStore, progress: bool = True) -> tuple[int, int]:
    """Upload the staged shard set to `store`; returns (shards uploaded, shards already there).

    Raises:
        ValueError: the URL is one that cannot be written (http).
        ShardStorageError: the store refused a write or stayed unreachable through the retries.
    """
    index = ShardIndex.load(staging)
    if not store.listable:
        raise ValueError(f"{store.location}: http(s) shard sets are read only; build to s3://, gs:// or a directory")
    present = set(store.names())
    uploaded = kept = 0
    sizes = {entry.name: (staging / entry.name).stat().st_size for entry in index.shards}
    with tqdm(
        total=sum(sizes.values()), unit="B", unit_scale=True, desc="uploading shards", disable=not progress
    ) as bar:
        for entry in index.shards:
            sidecar = entry.name + SIDECAR_SUFFIX
            staged = (staging / sidecar).read_bytes()
            if entry.name in present and sidecar in present and store.read_bytes(sidecar) == staged:
                kept += 1
            else:
                store.upload(staging / entry.name, entry.name)
                store.upload(staging / sidecar, sidecar)
                uploaded += 1
            bar.update(sizes[entry.name])
    wanted = {entry.name for entry in index.shards} | {entry.name + SIDECAR_SUFFIX for entry in index.shards}
    store.upload(staging / INDEX_NAME, INDEX_NAME)
    for name in sorted(present - wanted):
        if _PUBLISHED_FILE.match(name):  # a shard of an earlier, larger build; never anything else of the user's
            logger.info("removing stale %s", store.where(name))
            store.remove(name)
    return uploaded, kept
