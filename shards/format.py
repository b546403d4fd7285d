"""The on-disk shard format shared by the builder and the streaming reader.

A shard is a tar of samples; every field of a sample is one member named `<key>.<field>`:

| field        | content                                                                  |
|--------------|--------------------------------------------------------------------------|
| `ref.jpg`    | reference image, JPEG, short side `data.image_short_side`                |
| `tgt.jpg`    | target image, same encoding                                              |
| `txt`        | modification caption, UTF-8                                              |
| `json`       | metadata: id, source, reference/target names, noun-phrase texts, counts  |
| `cap.npy`    | caption token ids, int32 (77,)                                           |
| `spans.npy`  | NP token spans [start, end) into the caption ids, int32 (k, 2)           |
| `npids.npy`  | each NP tokenized alone (start/end tokens included), int32 (k, np_length) |

Keys are `[A-Za-z0-9_-]+` (no dots: the first dot separates key from field). Each shard set has an
`index.json` (see `ShardIndex`).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shards.storage import ShardStorageError, ShardStore

SCHEMA_VERSION = 1
INDEX_NAME = "index.json"
SIDECAR_SUFFIX = ".done.json"
"""Beside each shard: what its build wrote (`ShardResult`: counts, sha256, each sample's byte offset)."""
FIELDS = ("ref.jpg", "tgt.jpg", "txt", "json", "cap.npy", "spans.npy", "npids.npy")
_KEY_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,200}$")
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


class ShardFormatError(ValueError):
    """A sample or an index that does not follow the format."""


def sanitize_key(raw: str) -> str:
    """A sample key from an arbitrary id: unsafe runs become `_`, length capped, never empty."""
    key = _UNSAFE.sub("_", raw).strip("_")[:200]
    return key or "sample"


def shard_name(number: int) -> str:
    """File name of shard `number` in a shard set."""
    return f"shard-{number:06d}.tar"


def split_member_name(name: str) -> tuple[str, str] | None:
    """(key, field) of a tar member, or None when the name is not a safe, known member.

    Names come from files we did not necessarily write, so anything with a directory part, a parent reference,
    an unsafe character or an unknown field is refused rather than interpreted.
    """
    if "/" in name or "\\" in name or name.startswith("."):
        return None
    key, dot, rest = name.partition(".")
    if not dot or not _KEY_PATTERN.match(key) or rest not in FIELDS:
        return None
    return key, rest


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array, dtype=np.int32), allow_pickle=False)
    return buffer.getvalue()


def _npy_array(data: bytes, name: str) -> np.ndarray:
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as error:
        raise ShardFormatError(f"{name}: not a valid .npy array ({error})") from error
    if array.dtype.kind not in "iu":
        raise ShardFormatError(f"{name}: expected integer ids, got {array.dtype}")
    return array.astype(np.int64)


def encode_sample(
    key: str,
    reference_jpeg: bytes,
    target_jpeg: bytes,
    caption: str,
    metadata: dict[str, Any],
    caption_ids: np.ndarray,
    np_spans: np.ndarray,
    np_ids: np.ndarray,
) -> dict[str, bytes]:
    """The tar members of one sample, as `{member name: bytes}`."""
    if not _KEY_PATTERN.match(key):
        raise ShardFormatError(f"sample key {key!r} is not [A-Za-z0-9_-]+")
    spans = np.asarray(np_spans, dtype=np.int32).reshape(-1, 2)
    ids = np.asarray(np_ids, dtype=np.int32)
    ids = ids.reshape(len(spans), -1) if len(spans) else ids.reshape(0, max(ids.shape[-1:] or (0,)))
    return {
        f"{key}.ref.jpg": reference_jpeg,
        f"{key}.tgt.jpg": target_jpeg,
        f"{key}.txt": caption.encode("utf-8"),
        f"{key}.json": json.dumps(metadata, sort_keys=True, ensure_ascii=False).encode("utf-8"),
        f"{key}.cap.npy": _npy_bytes(np.asarray(caption_ids)),
        f"{key}.spans.npy": _npy_bytes(spans),
        f"{key}.npids.npy": _npy_bytes(ids),
    }


@dataclass
class TokenFields:
    """Token arrays of one sample, padded to fixed shapes for batching."""

    caption_ids: np.ndarray
    """int64 (77,)"""
    np_spans: np.ndarray
    """int64 (max_nps, 2); padded rows are (0, 0)"""
    np_mask: np.ndarray
    """bool (max_nps,); True for a real noun phrase"""
    np_ids: np.ndarray
    """int64 (max_nps, np_length); padded rows are all 0"""


def decode_tokens(fields: dict[str, bytes], max_nps: int, np_length: int, context_length: int = 77) -> TokenFields:
    """Parse and pad the token members of one sample; raises ShardFormatError when they are inconsistent."""
    caption_ids = _npy_array(fields["cap.npy"], "cap.npy")
    spans = _npy_array(fields["spans.npy"], "spans.npy").reshape(-1, 2)
    ids = _npy_array(fields["npids.npy"], "npids.npy")
    if caption_ids.shape != (context_length,):
        raise ShardFormatError(f"cap.npy has shape {caption_ids.shape}, expected ({context_length},)")
    if ids.ndim != 2 or ids.shape[0] != spans.shape[0]:
        raise ShardFormatError(f"npids.npy shape {ids.shape} does not match {spans.shape[0]} spans")
    if spans.size and (spans[:, 0].min() < 1 or (spans[:, 1] <= spans[:, 0]).any() or spans.max() > context_length):
        raise ShardFormatError(f"spans.npy has an invalid span: {spans.tolist()}")
    count = min(len(spans), max_nps)
    padded_spans = np.zeros((max_nps, 2), dtype=np.int64)
    padded_ids = np.zeros((max_nps, np_length), dtype=np.int64)
    mask = np.zeros((max_nps,), dtype=bool)
    padded_spans[:count] = spans[:count]
    width = min(np_length, ids.shape[1])
    padded_ids[:count, :width] = ids[:count, :width]
    mask[:count] = True
    return TokenFields(caption_ids, padded_spans, mask, padded_ids)


@dataclass
class ShardEntry:
    """One tar file of a shard set."""

    name: str
    count: int
    sha256: str


@dataclass
class ShardIndex:
    """`index.json` of a shard set."""

    tokenizer: str
    """Tokenizer the ids were made with (`shards.model_inputs.tokenizer_name`)."""
    context_length: int
    noun_phrases: dict[str, Any]
    """NP settings: parser, max_nps, np_length."""
    image_short_side: int
    seed: int
    shards: list[ShardEntry]
    sources: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per source: kind, weight, triplets read, taken, skipped (with reasons), truncated NPs."""
    schema_version: int = SCHEMA_VERSION

    @property
    def total_samples(self) -> int:
        return sum(entry.count for entry in self.shards)

    def to_json(self) -> dict[str, Any]:
        payload = asdict(self)
        payload["totals"] = {
            "samples": self.total_samples,
            "shards": len(self.shards),
            "skipped": sum(int(s.get("skipped", 0)) for s in self.sources.values()),
            "truncated_nps": sum(int(s.get("truncated_nps", 0)) for s in self.sources.values()),
        }
        return payload

    def save(self, directory: str | Path) -> Path:
        """Write `index.json` atomically (temporary name, then rename)."""
        path = Path(directory) / INDEX_NAME
        temporary = path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(self.to_json(), indent=2, sort_keys=True))
        temporary.replace(path)
        return path

    @classmethod
    def load(cls, location: str | Path | ShardStore) -> ShardIndex:
        """Read and check the index of a shard set (a directory, a URL or a `ShardStore`); a clear error when it is
        absent or malformed."""
        store = location if isinstance(location, ShardStore) else ShardStore(str(location))
        path = store.where(INDEX_NAME)
        try:
            raw = store.read_bytes(INDEX_NAME)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"no shard index at {path}; build the shards first (launch/build_shards.py)"
            ) from None
        try:
            payload = json.loads(raw)
            if payload.get("schema_version") != SCHEMA_VERSION:
                raise ShardFormatError(
                    f"{path}: schema_version {payload.get('schema_version')} is not {SCHEMA_VERSION}; rebuild"
                )
            return cls(
                tokenizer=payload["tokenizer"],
                context_length=int(payload["context_length"]),
                noun_phrases=dict(payload["noun_phrases"]),
                image_short_side=int(payload["image_short_side"]),
                seed=int(payload["seed"]),
                shards=[ShardEntry(e["name"], int(e["count"]), e["sha256"]) for e in payload["shards"]],
                sources=dict(payload.get("sources", {})),
                schema_version=int(payload["schema_version"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise ShardFormatError(f"{path}: malformed shard index ({error})") from error


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


_OFFSETS: dict[tuple[str, str, str], tuple[int, ...]] = {}


def member_offsets(store: ShardStore, shard: str, sha256: str) -> tuple[int, ...] | None:
    """Byte offset of each sample in `shard`, from its build sidecar, when the sidecar describes this very shard
    (its sha256 is the index's); None otherwise (no sidecar, an older one, another build's, or unreadable).

    With them a slot starting at sample k seeks straight there instead of reading the k headers before it (one
    range request each on an object store). Found offsets are kept per process, keyed by the shard's sha256; a
    failure is not kept, so the next piece asks again.
    """
    key = (store.location, shard, sha256)
    if key in _OFFSETS:
        return _OFFSETS[key]
    try:
        payload = json.loads(store.read_bytes(shard + SIDECAR_SUFFIX))
    except (OSError, ShardStorageError, ValueError):
        return None
    if not isinstance(payload, dict) or payload.get("sha256") != sha256:
        return None
    offsets = payload.get("offsets")
    if not isinstance(offsets, list) or not all(isinstance(value, int) for value in offsets):
        return None
    if len(offsets) != payload.get("count"):
        return None
    _OFFSETS[key] = tuple(offsets)
    return _OFFSETS[key]
