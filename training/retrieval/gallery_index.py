"""Gallery indexes: embedding shards, ids and paths, a manifest carrying the bundle's hash, and a faiss index.

    <index>/plan.json                what is being built: bundle hash, the input list's digest, shard and batch size
    <index>/shards/part_00000.npy    (n, D) float32 gallery embeddings, L2-normalised
    <index>/shards/part_00000.json   {"ids": [...], "paths": [...], "skipped": [{"id", "path", "error"}]}
    <index>/vectors.faiss            the vector index (flat, IVF or HNSW; inner product = cosine)
    <index>/skipped.jsonl            every image that could not be read, with the reason
    <index>/manifest.json            written last: the index is complete when it exists

A shard is finished when its `.json` exists (its `.npy` is renamed into place before). A rerun of the same build
keeps finished shards and encodes the rest; a different bundle or input list in the same directory is refused.
How the shards get encoded (in this process, or by Ray Data actors in `cluster/jobs/indexing.py`) is the caller's
choice: both call `encode_chunk` on the same fixed chunks, so they agree bit for bit. Building (plan, resume,
shards, the faiss index, the manifest) is `training.retrieval.gallery_build`; this module holds the layout, the
inputs, the encoding of one chunk and the search side.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from training.retrieval.config import IndexConfig
from training.retrieval.hit import Hit

if TYPE_CHECKING:
    from training.retrieval.retriever import Retriever

INDEX_FORMAT = 1
PLAN = "plan.json"
MANIFEST = "manifest.json"
SHARDS = "shards"
VECTORS = "vectors.faiss"
SKIPPED = "skipped.jsonl"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class GalleryIndexError(ValueError):
    """An index directory that cannot be built, resumed or searched as asked; the message says why."""


class BundleMismatch(GalleryIndexError):
    """The index was built from another bundle: its embeddings live in a different space."""


class GalleryItem(NamedTuple):
    id: str
    path: str


@dataclass
class ChunkResult:
    """One encoded chunk: the readable images' ids, paths and embeddings, and the unreadable ones."""

    ids: list[str]
    paths: list[str]
    embeddings: np.ndarray
    skipped: list[dict[str, str]] = field(default_factory=list)


ChunkEncoder = Callable[[Sequence[Sequence[GalleryItem]]], Iterator[ChunkResult]]
"""Encodes chunks (each at most `index.batch_size` images) and yields their results in the same order."""


# --- inputs -------------------------------------------------------------------------------------------------------


def list_images(source: str | Path) -> list[GalleryItem]:
    """The gallery a folder or list file names, in a stable order.

    - a folder: every image file below it, sorted; the id is the path relative to the folder;
    - a `.txt` list: one `path` or `id<TAB>path` per line (`#` comments); relative paths are relative to the list;
    - a `.jsonl` list: `{"id": ..., "path": ...}` per line.

    Raises:
        GalleryIndexError: no such folder or file, an empty gallery, a malformed line, or a repeated id.
    """
    source = Path(source)
    if source.is_dir():
        files = sorted(path for path in source.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file())
        items = [GalleryItem(path.relative_to(source).as_posix(), str(path.resolve())) for path in files]
    elif source.is_file():
        items = list(_read_list(source))
    else:
        raise GalleryIndexError(f"--images {source}: no such folder or list file")
    if not items:
        raise GalleryIndexError(f"--images {source}: no images found (suffixes {', '.join(IMAGE_SUFFIXES)})")
    seen: set[str] = set()
    for item in items:
        if item.id in seen:
            raise GalleryIndexError(f"--images {source}: id {item.id!r} appears twice")
        seen.add(item.id)
    return items


def _read_list(path: Path) -> Iterator[GalleryItem]:
    base = path.parent
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if path.suffix == ".jsonl":
            try:
                record = json.loads(line)
                image_id, image_path = str(record["id"]), str(record["path"])
            except (ValueError, KeyError, TypeError) as error:
                raise GalleryIndexError(f"{path}:{number}: expected {{'id': ..., 'path': ...}}: {error!r}") from error
        else:
            image_id, _, image_path = line.rpartition("\t")
            image_id = image_id or image_path
        resolved = Path(image_path) if Path(image_path).is_absolute() else base / image_path
        yield GalleryItem(image_id, str(resolved.resolve()))  # absolute: the server and sheets run elsewhere


def items_digest(items: Sequence[GalleryItem]) -> str:
    digest = hashlib.sha256()
    for item in items:
        digest.update(f"{item.id}\t{item.path}\n".encode())
    return digest.hexdigest()


# --- encoding -----------------------------------------------------------------------------------------------------


def encode_chunk(retriever: Retriever, chunk: Sequence[GalleryItem]) -> ChunkResult:
    """Decode a chunk's images (skipping unreadable ones) and encode the rest in one batch."""
    from training.retrieval.retriever import UnreadableImage, open_image

    pixels, kept, skipped = [], [], []
    for item in chunk:
        try:
            pixels.append(retriever.transform(open_image(item.path)))
            kept.append(item)
        except UnreadableImage as error:
            skipped.append({"id": item.id, "path": item.path, "error": str(error)})
    if pixels:
        import torch

        embeddings = retriever.encode_pixels(torch.stack(pixels))
    else:
        embeddings = np.zeros((0, retriever.embed_dim), dtype=np.float32)
    return ChunkResult([item.id for item in kept], [item.path for item in kept], embeddings, skipped)


def local_encoder(retriever: Retriever) -> ChunkEncoder:
    """Encode chunks one after another in this process."""

    def encode(chunks: Sequence[Sequence[GalleryItem]]) -> Iterator[ChunkResult]:
        for chunk in chunks:
            yield encode_chunk(retriever, chunk)

    return encode


# --- shards ----------------------------------------------------------------------------------------------------


def shard_stem(index: int) -> str:
    return f"part_{index:05d}"


def read_shards(out: Path, shards: int) -> tuple[list[str], list[str], np.ndarray, list[dict[str, str]]]:
    """Every shard's ids, paths, embeddings and skipped images, in gallery order."""
    ids, paths, arrays, skipped = [], [], [], []
    for index in range(shards):
        stem = out / SHARDS / shard_stem(index)
        listing = json.loads(stem.with_suffix(".json").read_text())
        array = np.load(stem.with_suffix(".npy"), allow_pickle=False)
        if array.shape[0] != len(listing["ids"]):
            raise GalleryIndexError(f"{stem}.npy holds {array.shape[0]} rows but its listing {len(listing['ids'])} ids")
        ids += listing["ids"]
        paths += listing["paths"]
        arrays.append(array)
        skipped += listing["skipped"]
    return ids, paths, np.concatenate(arrays) if arrays else np.zeros((0, 0), np.float32), skipped


# --- the vector index ---------------------------------------------------------------------------------------------


def build_vector_index(embeddings: np.ndarray, config: IndexConfig):
    """(faiss index over `embeddings` by inner product, the parameters it was built with)."""
    import faiss

    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    count, dim = embeddings.shape
    if config.kind == "flat":
        index = faiss.IndexFlatIP(dim)
        params: dict[str, Any] = {"kind": "flat"}
    elif config.kind == "ivf":
        nlist = config.nlist or int(4 * np.sqrt(count))
        nlist = max(1, min(nlist, count // 39 or 1))  # faiss wants ~39 training points per list
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(embeddings)
        nprobe = config.nprobe or max(1, nlist // 4)
        params = {"kind": "ivf", "nlist": nlist, "nprobe": nprobe}
    else:
        index = faiss.IndexHNSWFlat(dim, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = config.ef_construction
        params = {
            "kind": "hnsw",
            "m": config.hnsw_m,
            "ef_construction": config.ef_construction,
            "ef_search": config.ef_search,
        }
    index.add(embeddings)
    _apply_search_params(index, params)
    return index, params


def _apply_search_params(index, params: dict[str, Any]) -> None:
    if params["kind"] == "ivf":
        index.nprobe = int(params["nprobe"])
    elif params["kind"] == "hnsw":
        index.hnsw.efSearch = int(params["ef_search"])


def write_faiss(index, path: Path) -> None:
    import faiss

    faiss.write_index(index, str(path))


# --- searching ----------------------------------------------------------------------------------------------------


class GalleryIndex:
    """A finished index, opened for search."""

    def __init__(self, directory: Path, manifest: dict[str, Any], ids: list[str], paths: list[str], vectors) -> None:
        self.directory = directory
        self.manifest = manifest
        self.ids = ids
        self.paths = paths
        self.vectors = vectors
        self.position = {image_id: position for position, image_id in enumerate(ids)}

    @classmethod
    def open(cls, directory: str | Path) -> GalleryIndex:
        """Read a complete index.

        Raises:
            GalleryIndexError: no manifest (not an index, or a build that did not finish), or damaged files.
        """
        import faiss

        directory = Path(directory)
        manifest_file = directory / MANIFEST
        if not manifest_file.is_file():
            hint = (
                " (its build did not finish: run launch/index.py again to resume it)"
                if (directory / PLAN).is_file()
                else ""
            )
            raise GalleryIndexError(f"not a finished index: {manifest_file} is missing{hint}")
        manifest = json.loads(manifest_file.read_text())
        if manifest.get("format") != INDEX_FORMAT:
            raise GalleryIndexError(
                f"{manifest_file}: index format {manifest.get('format')!r}, this code reads {INDEX_FORMAT}"
            )
        ids, paths, _, _ = read_shards(directory, int(manifest["shards"]))
        vectors = faiss.read_index(str(directory / VECTORS))
        if vectors.ntotal != len(ids):
            raise GalleryIndexError(
                f"{directory / VECTORS} holds {vectors.ntotal} vectors but the shards {len(ids)} ids"
            )
        _apply_search_params(vectors, manifest["index"])
        return cls(directory, manifest, ids, paths, vectors)

    @property
    def bundle_hash(self) -> str:
        return str(self.manifest["bundle_sha256"])

    @property
    def bundle_dir(self) -> Path | None:
        """The bundle the gallery was embedded with, where the build found it (None when not recorded)."""
        recorded = self.manifest.get("bundle")
        return Path(recorded) if recorded else None

    def __len__(self) -> int:
        return len(self.ids)

    def check_bundle(self, bundle_hash: str) -> None:
        """Raise BundleMismatch unless the queries come from the bundle the gallery was embedded with."""
        if bundle_hash != self.bundle_hash:
            raise BundleMismatch(
                f"{self.directory} was built from bundle {self.bundle_hash[:12]}, the queries come from "
                f"{bundle_hash[:12]}: embeddings of different models are not comparable; index the gallery "
                "again with this bundle"
            )

    def search(self, queries: np.ndarray, k: int, exclude: Sequence[Iterable[str]] | None = None) -> list[list[Hit]]:
        """Top-k hits per query (rows of `queries`), best first, leaving out each query's `exclude` ids."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        excluded = [set(ids) for ids in exclude] if exclude is not None else [set() for _ in range(len(queries))]
        extra = max((len(ids) for ids in excluded), default=0)
        depth = min(k + extra, len(self.ids))
        if depth == 0:
            return [[] for _ in range(len(queries))]
        scores, positions = self.vectors.search(queries, depth)
        results = []
        for row in range(len(queries)):
            hits: list[Hit] = []
            for score, position in zip(scores[row], positions[row]):
                if position < 0 or self.ids[position] in excluded[row]:
                    continue
                hits.append(Hit(len(hits) + 1, self.ids[position], self.paths[position], float(score)))
                if len(hits) == k:
                    break
            results.append(hits)
        return results
