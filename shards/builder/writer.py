"""Writing one shard: images re-encoded, captions tokenized, members in a byte-deterministic tar, then a sidecar.

A shard is written to `shard-XXXXXX.tar.tmp` and renamed when complete; only then is its sidecar
`shard-XXXXXX.tar.done.json` written (atomically), recording the plan fingerprint, sha256, sample count and what
was skipped. A shard without a matching sidecar, or whose bytes no longer hash right, is not complete.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path

from PIL import Image

from shards.builder.noun_phrases import NounPhrase
from shards.builder.tokens import CaptionTokenizer
from shards.format import SIDECAR_SUFFIX, encode_sample, file_sha256

logger = logging.getLogger(__name__)

# Fixed tar header fields: the bytes of a shard depend on its samples only, not on who built it or when.
_TAR_MTIME = 0
_TAR_MODE = 0o644


def write_json_atomically(path: Path, payload: object) -> None:
    """Write JSON to a temporary name, then rename it over `path`."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(payload, indent=1, sort_keys=True))
    os.replace(temporary, path)


@dataclass(slots=True)
class SampleSpec:
    """Everything a build worker needs to write one sample (picklable, and hashed into the shard fingerprint)."""

    key: str
    id: str
    source: str
    copy: int
    caption: str
    reference_name: str
    target_name: str
    reference_path: str
    target_path: str
    noun_phrases: list[tuple[str, int, int]]
    """(text, start char, end char) in breadth-first order."""
    phrase_boxes: dict[str, list[float]] = field(default_factory=dict)
    """NP text -> (x0, y0, x1, y1) in the reference image, for the NPs the source knows a box of."""


@dataclass
class ShardTask:
    """One shard to write."""

    number: int
    path: str
    samples: list[SampleSpec]
    backbone: str
    np_length: int
    image_short_side: int
    jpeg_quality: int
    fingerprint: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ShardTask:
        fields = json.loads(text)
        return cls(**{**fields, "samples": [SampleSpec(**sample) for sample in fields["samples"]]})


@dataclass
class ShardResult:
    """What one written shard holds; stored as its sidecar."""

    name: str
    fingerprint: str
    count: int
    sha256: str
    skipped: dict[str, dict[str, int]] = field(default_factory=dict)
    """source -> reason -> samples skipped while writing (missing or unreadable images)."""
    dropped_nps: dict[str, dict[str, int]] = field(default_factory=dict)
    """source -> reason -> noun phrases that got no token span."""
    kept_nps: dict[str, int] = field(default_factory=dict)
    offsets: list[int] | None = None
    """Byte offset of each written sample's first tar header: a reader seeks there to start mid-shard. None in
    sidecars written before offsets were recorded."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds this write spent per stage (`tokenize`, `images`, `tar`, `hash`); not stored in the sidecar, whose
    bytes depend on the plan only."""

    def sidecar(self) -> dict:
        """The sidecar's content: everything but the timings."""
        fields = asdict(self)
        del fields["timings"]
        return fields


def encode_image(path: str, short_side: int, quality: int) -> bytes:
    """The image at `path` as RGB JPEG bytes, resized so its short side is `short_side` (aspect kept)."""
    with Image.open(path) as image:
        image.load()
        rgb = image.convert("RGB")
    width, height = rgb.size
    scale = short_side / min(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if size != rgb.size:
        rgb = rgb.resize(size, Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    rgb.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


@cache
def _caption_tokenizer(backbone: str, np_length: int) -> CaptionTokenizer:
    return CaptionTokenizer(backbone, np_length)


def _image_or_reason(path: str, task: ShardTask, images: dict[str, bytes | str]) -> bytes | str:
    """Re-encoded bytes of an image (each image once per shard), or the reason it cannot be used."""
    if path not in images:
        try:
            images[path] = encode_image(path, task.image_short_side, task.jpeg_quality)
        except FileNotFoundError:
            images[path] = "missing_image"
        except Exception as error:  # PIL raises many types for damaged files; all mean "skip this triplet"
            logger.warning("unreadable image %s: %s", path, error)
            images[path] = "unreadable_image"
    return images[path]


def _tar_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, _TAR_MTIME, _TAR_MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def write_shard(task: ShardTask) -> ShardResult:
    """Write one shard (temporary name, then rename) and its sidecar; samples with bad images are skipped."""
    tok = _caption_tokenizer(task.backbone, task.np_length)
    path = Path(task.path)
    temporary = path.with_name(path.name + ".tmp")
    images: dict[str, bytes | str] = {}
    skipped: dict[str, Counter] = {}
    dropped: dict[str, Counter] = {}
    kept: Counter = Counter()
    count = 0
    offsets: list[int] = []
    timings = dict.fromkeys(("tokenize", "images", "tar", "hash"), 0.0)
    with open(temporary, "wb") as handle:
        with tarfile.open(fileobj=handle, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for spec in task.samples:
                started = time.perf_counter()
                reference = _image_or_reason(spec.reference_path, task, images)
                target = _image_or_reason(spec.target_path, task, images)
                timings["images"] += time.perf_counter() - started
                reason = next((image for image in (reference, target) if isinstance(image, str)), None)
                if reason is not None:
                    skipped.setdefault(spec.source, Counter())[reason] += 1
                    continue
                started = time.perf_counter()
                phrases = [NounPhrase(text, start, end) for text, start, end in spec.noun_phrases]
                tokens = tok.tokenize(spec.caption, phrases)
                timings["tokenize"] += time.perf_counter() - started
                started = time.perf_counter()
                dropped.setdefault(spec.source, Counter()).update(tokens.dropped)
                kept[spec.source] += len(tokens.noun_phrases)
                metadata = {
                    "id": spec.id,
                    "source": spec.source,
                    "copy": spec.copy,
                    "reference": spec.reference_name,
                    "target": spec.target_name,
                    "noun_phrases": tokens.noun_phrases,
                    "dropped_nps": dict(tokens.dropped),
                }
                if spec.phrase_boxes:
                    metadata["np_boxes"] = [spec.phrase_boxes.get(text) for text in tokens.noun_phrases]
                members = encode_sample(
                    spec.key,
                    reference,
                    target,
                    spec.caption,
                    metadata,
                    tokens.caption_ids,
                    tokens.np_spans,
                    tokens.np_ids,
                )
                offsets.append(tar.offset)
                for name, data in members.items():
                    tar.addfile(_tar_info(name, len(data)), io.BytesIO(data))
                count += 1
                timings["tar"] += time.perf_counter() - started
        started = time.perf_counter()
        handle.flush()
        os.fsync(handle.fileno())
        timings["tar"] += time.perf_counter() - started
    os.replace(temporary, path)
    started = time.perf_counter()
    digest = file_sha256(path)
    timings["hash"] = time.perf_counter() - started
    result = ShardResult(
        name=path.name,
        fingerprint=task.fingerprint,
        count=count,
        sha256=digest,
        skipped={source: dict(reasons) for source, reasons in skipped.items()},
        dropped_nps={source: dict(reasons) for source, reasons in dropped.items() if reasons},
        kept_nps=dict(kept),
        offsets=offsets,
        timings=timings,
    )
    write_json_atomically(path.with_name(path.name + SIDECAR_SUFFIX), result.sidecar())
    return result


def complete_result(task: ShardTask) -> ShardResult | None:
    """The sidecar's result when the shard on disk is the complete output of this very task, else None."""
    path = Path(task.path)
    sidecar = path.with_name(path.name + SIDECAR_SUFFIX)
    if not path.is_file() or not sidecar.is_file():
        return None
    try:
        fields = json.loads(sidecar.read_text())
        fields.pop("timings", None)
        result = ShardResult(**fields)
    except (ValueError, TypeError):
        return None
    if result.fingerprint != task.fingerprint or result.sha256 != file_sha256(path):
        return None
    return result
