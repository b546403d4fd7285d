"""Small shard sets for tests: real tar shards in the project format with tiny JPEGs and a real index.

Also helpers that damage a shard the way disks and interrupted copies do (truncate, corrupt a member, add a
member with an unsafe name).
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from shards.format import ShardEntry, ShardIndex, encode_sample, file_sha256, shard_name
from shards.model_inputs import CONTEXT_LENGTH, TINY_BACKBONE, tokenizer, tokenizer_name

COLORS = ("red", "green", "blue", "yellow", "white", "black", "purple")
SHAPES = ("cube", "ball", "cone", "ring", "star")
_RGB = {
    "red": (200, 30, 30),
    "green": (30, 180, 60),
    "blue": (40, 60, 200),
    "yellow": (220, 210, 40),
    "white": (240, 240, 240),
    "black": (15, 15, 15),
    "purple": (130, 40, 160),
}


def jpeg_bytes(rgb: tuple[int, int, int], size: tuple[int, int] = (12, 10)) -> bytes:
    """A tiny solid-colour JPEG."""
    buffer = io.BytesIO()
    Image.new("RGB", size, rgb).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def sample_members(
    key: str, number: int, backbone: str = TINY_BACKBONE, np_length: int = 16, image_size: tuple[int, int] = (12, 10)
) -> dict[str, bytes]:
    """Members of one valid sample; caption and noun phrases vary with `number`."""
    color, other = COLORS[number % len(COLORS)], COLORS[(number + 3) % len(COLORS)]
    shape = SHAPES[number % len(SHAPES)]
    first_np, second_np = f"the {color} {shape}", f"a {other} box"
    caption = f"put {first_np} next to {second_np}"
    tok = tokenizer(backbone)
    caption_ids = tok([caption])[0].numpy()
    spans = []
    for phrase in (first_np, second_np):
        # CLIP's BPE works word by word, so the tokens before a phrase are those of the words before it.
        start = 1 + len(tok.encode(caption[: caption.index(phrase)]))
        spans.append((start, start + len(tok.encode(phrase))))
    np_ids = tok([first_np, second_np], context_length=np_length).numpy()
    metadata = {"id": key, "source": "fixture", "noun_phrases": [first_np, second_np]}
    return encode_sample(
        key,
        jpeg_bytes(_RGB[color], image_size),
        jpeg_bytes(_RGB[other], image_size),
        caption,
        metadata,
        caption_ids,
        np.array(spans),
        np_ids,
    )


def write_tar(path: Path, members: dict[str, bytes]) -> None:
    """A tar holding `members` in order."""
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))


def shard_keys(shard: int, count: int) -> list[str]:
    return [f"s{shard:02d}_{i:03d}" for i in range(count)]


def write_shard_set(
    directory: Path, sizes: list[int], backbone: str = TINY_BACKBONE, image_size: tuple[int, int] = (12, 10)
) -> ShardIndex:
    """Shards of the given sample counts plus `index.json`; sample keys are `s<shard>_<i>` (see `shard_keys`)."""
    directory.mkdir(parents=True, exist_ok=True)
    entries = []
    number = 0
    for shard, count in enumerate(sizes):
        members: dict[str, bytes] = {}
        for key in shard_keys(shard, count):
            members.update(sample_members(key, number, backbone, image_size=image_size))
            number += 1
        path = directory / shard_name(shard)
        write_tar(path, members)
        entries.append(ShardEntry(path.name, count, file_sha256(path)))
    index = ShardIndex(
        tokenizer=tokenizer_name(backbone),
        context_length=CONTEXT_LENGTH,
        noun_phrases={"parser": "trees", "max_nps": 10, "np_length": 16},
        image_short_side=min(image_size),
        seed=0,
        shards=entries,
        sources={"fixture": {"kind": "jsonl", "taken": number, "skipped": 0}},
    )
    index.save(directory)
    return index


def read_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path, "r:") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]


def replace_member(path: Path, name: str, data: bytes) -> None:
    """Rewrite a shard with the bytes of member `name` replaced (the index is left as it was)."""
    members = read_members(path)
    members[name] = data
    write_tar(path, members)


def insert_member(path: Path, after: str, name: str, data: bytes) -> None:
    """Rewrite a shard with an extra member `name` right after member `after`."""
    members: dict[str, bytes] = {}
    for existing, content in read_members(path).items():
        members[existing] = content
        if existing == after:
            members[name] = data
    write_tar(path, members)


def truncate(path: Path, fraction: float) -> None:
    """Cut a shard to `fraction` of its bytes, as an interrupted copy would."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def parse_captions(captions, config, trees: str | None):
    """One source's captions through the build's own parse step (`run_parse_job`), as one chunk."""
    from shards.builder.parse_cache import ParseJob, run_parse_job

    return run_parse_job(ParseJob("source", 0, tuple(dict.fromkeys(captions)), config, trees, "unused.json"))
