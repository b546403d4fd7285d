"""Reader stages below the shuffle buffer: tar members -> grouped samples, and samples -> tensors -> batches.

Every stage takes an error handler. The default, `SkipAndCount`, counts the problem under a named kind, logs the
first occurrences and lets the stage skip the sample or shard; a strict handler may raise instead.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import PurePosixPath
from typing import Any

import numpy as np
import torch
from PIL import Image

from shards.format import FIELDS, ShardFormatError, decode_tokens, member_offsets, split_member_name
from shards.model_inputs import box_in_crop, uint8_transform
from shards.storage import ShardStore
from shards.stream.plan import Piece

logger = logging.getLogger(__name__)

CORRUPT_SAMPLES = "corrupt_samples"
"""A sample whose image, token arrays, caption or metadata cannot be decoded."""
INCOMPLETE_SAMPLES = "incomplete_samples"
"""A key whose members lack a field or repeat one."""
UNSAFE_MEMBERS = "unsafe_members"
"""A tar member whose name is not `<safe key>.<known field>` (path parts, odd characters, unknown field)."""
TRUNCATED_SHARDS = "truncated_shards"
"""A shard piece that ended in a read error or held fewer samples than the index lists."""
REFILLED_SAMPLES = "refilled_samples"
"""Samples a slot took from outside its range to make up for ones it lost."""
DATA_PROBLEMS = (CORRUPT_SAMPLES, INCOMPLETE_SAMPLES, UNSAFE_MEMBERS, TRUNCATED_SHARDS, REFILLED_SAMPLES)
"""Every kind a reader counts; the training loop logs each as `data/<kind>` (metrics.jsonl, TensorBoard)."""
_LOGGED_PER_KIND = 3
_IMAGE_FORMATS = ("JPEG", "PNG")
"""Decoders tried on image members; naming them skips PIL's probing of every format it knows."""


class SkipAndCount:
    """Error policy that counts each problem under its kind and lets the stage skip it.

    `counts` is shared with the slot cursor, so the counts travel with the reader state. While `muted`, problems
    are not counted: a resumed slot re-reads records it already accounted for before the save.
    """

    def __init__(self, counts: dict[str, int], where: str = "") -> None:
        self.counts = counts
        self.where = where
        self.muted = False

    def __call__(self, kind: str, error: BaseException | str) -> None:
        if self.muted:
            return
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if self.counts[kind] <= _LOGGED_PER_KIND:
            logger.warning("%sskipped (%s): %s", f"{self.where}: " if self.where else "", kind, error)


ErrorHandler = Callable[[str, "BaseException | str"], None]


@dataclass
class Record:
    """One complete sample read from a tar; `fields` is None when the reader skipped its bytes."""

    key: str
    fields: dict[str, bytes] | None


def read_records(
    store: ShardStore,
    pieces: list[Piece],
    handler: ErrorHandler,
    wanted: Callable[[int], bool] | None = None,
    digests: Mapping[str, str] | None = None,
) -> Iterator[Record]:
    """Samples of `pieces` in tar order, grouped from their members.

    Records are numbered 0, 1, ... in the order they are yielded; `wanted(number)` decides whether a record's
    member bytes are read. Unwanted records still come out (with `fields=None`) so that the numbering holds, but
    only their tar headers are read, which makes skipping to a resume point cheap. A group is only yielded once
    the tar shows it is complete (the next key starts, or the tar ends cleanly), so a member cut by truncation
    never yields a partial sample, whether or not its bytes were read.

    A piece that starts mid-shard seeks to its first sample when the shard's sidecar records the byte offsets and
    its sha256 is the index's (`digests`: shard name -> sha256), else it reads its way there header by header. A
    store that cannot be read at all raises `ShardStorageError`.
    """
    number = 0
    for piece in pieces:
        path = PurePosixPath(piece.shard)
        ordinal = -1
        key: str | None = None
        fields: dict[str, bytes | None] = {}
        take = load = False
        try:
            known = digests.get(piece.shard) if digests and piece.first > 0 else None
            offsets = member_offsets(store, piece.shard, known) if known else None
            with store.open(piece.shard) as handle:
                if offsets is not None and piece.first < len(offsets):
                    handle.seek(offsets[piece.first])
                    ordinal = piece.first - 1
                tar = tarfile.open(fileobj=handle, mode="r:")
                while (member := tar.next()) is not None:
                    parsed = split_member_name(member.name) if member.isfile() else None
                    if parsed is None:
                        handler(UNSAFE_MEMBERS, f"{path.name}: member {member.name!r} refused")
                        continue
                    member_key, field = parsed
                    if member_key != key:
                        if take:
                            record = _finish_group(key, fields, load, handler, path)
                            if record is not None:
                                number += 1
                                yield record
                        ordinal += 1
                        key, fields = member_key, {}
                        if ordinal >= piece.stop:
                            take = False
                            break
                        take = ordinal >= piece.first
                        load = take and (wanted is None or wanted(number))
                    if not take:
                        continue
                    if field in fields:
                        fields["__duplicate__"] = None
                    extracted = tar.extractfile(member) if load else None
                    fields[field] = extracted.read() if extracted is not None else None
                if take:
                    record = _finish_group(key, fields, load, handler, path)
                    if record is not None:
                        number += 1
                        yield record
                if ordinal + 1 < piece.stop:
                    handler(TRUNCATED_SHARDS, f"{path.name}: {ordinal + 1} samples, index lists at least {piece.stop}")
        except (tarfile.TarError, OSError, EOFError) as error:
            handler(TRUNCATED_SHARDS, f"{path.name}: {type(error).__name__}: {error}")


def _finish_group(
    key: str | None, fields: dict[str, bytes | None], load: bool, handler: ErrorHandler, path: PurePosixPath
) -> Record | None:
    if key is None or set(fields) != set(FIELDS):
        handler(INCOMPLETE_SAMPLES, f"{path.name}: sample {key!r} has members {sorted(fields)}")
        return None
    return Record(key, dict(fields) if load else None)  # type: ignore[arg-type]


@cache
def _transform(backbone: str):
    # uint8 pixels: a quarter of float32's bytes in the loaders' shared memory and in the copy to the GPU. The
    # model normalises them on its device (`ClipBackbone.encode_image`).
    return uint8_transform(backbone)


def _rgb(data: bytes, field: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data), formats=_IMAGE_FORMATS) as image:
            image.load()
            return image.convert("RGB")
    except Exception as error:
        raise ShardFormatError(f"{field}: not a readable image ({error})") from error


def _image_tensor(data: bytes, backbone: str, field: str) -> torch.Tensor:
    return _transform(backbone)(_rgb(data, field))


def _boxes_in_crop(raw: list, count: int, max_nps: int, size: tuple[int, int]) -> np.ndarray:
    """(max_nps, 4) NP boxes in fractions of the centre square the transform keeps; NaN where unknown or cropped away."""
    boxes = np.full((max_nps, 4), np.nan, dtype=np.float32)
    for index, box in enumerate(raw[: min(count, max_nps)]):
        if box is None:
            continue
        if not (isinstance(box, list) and len(box) == 4):
            raise ShardFormatError(f"json: np_boxes[{index}] must be [x0, y0, x1, y1] or null, got {box!r}")
        x0, y0, x1, y1 = box_in_crop(box, *size)
        if x1 > x0 and y1 > y0:  # a box wholly outside the crop names nothing the model sees
            boxes[index] = (x0, y0, x1, y1)
    return boxes


def decode_sample(record: Record, backbone: str, max_nps: int, np_length: int) -> dict[str, Any]:
    """Tensors and texts of one sample; raises ShardFormatError (or a decoding error) when any field is bad."""
    fields = record.fields
    if fields is None:
        raise ValueError(f"sample {record.key}: bytes were skipped, cannot decode")
    tokens = decode_tokens(fields, max_nps=max_nps, np_length=np_length)
    caption = fields["txt"].decode("utf-8")
    metadata = json.loads(fields["json"].decode("utf-8"))
    phrases = metadata.get("noun_phrases", []) if isinstance(metadata, dict) else None
    real = int(tokens.np_mask.sum())
    if not isinstance(phrases, list) or len(phrases) < real:
        raise ShardFormatError(f"json: noun_phrases must list one text per span, got {phrases!r} for {real} spans")
    reference = _rgb(fields["ref.jpg"], "ref.jpg")
    np_boxes = _boxes_in_crop(metadata.get("np_boxes", []), real, max_nps, reference.size)
    return {
        "reference_image": _transform(backbone)(reference),
        "target_image": _image_tensor(fields["tgt.jpg"], backbone, "tgt.jpg"),
        "caption_ids": tokens.caption_ids,
        "np_spans": tokens.np_spans,
        "np_mask": tokens.np_mask,
        "np_ids": tokens.np_ids,
        "np_boxes": np_boxes,
        "key": record.key,
        "caption": caption,
        "noun_phrases": [str(text) for text in phrases[:real]],
    }


def decode_stage(
    records: Iterator[Record],
    backbone: str,
    max_nps: int,
    np_length: int,
    handler: ErrorHandler,
    on_bad: Callable[[], None] | None = None,
) -> Iterator[dict[str, Any]]:
    """Decoded samples; a sample that fails to decode is reported to `handler` and skipped."""
    for record in records:
        try:
            sample = decode_sample(record, backbone, max_nps, np_length)
        except Exception as error:  # any undecodable byte string is a data problem, never a reason to stop training
            handler(CORRUPT_SAMPLES, f"sample {record.key}: {error}")
            if on_bad is not None:
                on_bad()
            continue
        yield sample


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """The batch dict of the reader contract from decoded samples; the images stay uint8 pixels (B, 3, S, S)."""
    return {
        "reference_image": torch.stack([s["reference_image"] for s in samples]),
        "target_image": torch.stack([s["target_image"] for s in samples]),
        "caption_ids": torch.from_numpy(np.stack([s["caption_ids"] for s in samples]).astype(np.int64)),
        "np_spans": torch.from_numpy(np.stack([s["np_spans"] for s in samples]).astype(np.int64)),
        "np_mask": torch.from_numpy(np.stack([s["np_mask"] for s in samples]).astype(bool)),
        "np_ids": torch.from_numpy(np.stack([s["np_ids"] for s in samples]).astype(np.int64)),
        "np_boxes": torch.from_numpy(np.stack([s["np_boxes"] for s in samples])),
        "keys": [s["key"] for s in samples],
        "captions": [s["caption"] for s in samples],
        "noun_phrases": [s["noun_phrases"] for s in samples],
    }
