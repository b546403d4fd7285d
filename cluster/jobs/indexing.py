"""Gallery embedding on Ray Data: encoder actors (one GPU each when the cluster has GPUs) encode fixed chunks.

The build itself (shards, resume, the faiss index) is `training.retrieval.gallery_build.build_index`; this module only
supplies its `ChunkEncoder`. Each Ray Data row is one chunk of at most `index.batch_size` images, mapped by an
actor that loads the bundle once and calls `encode_chunk`, exactly what a single-process build calls, so both
give the same embeddings bit for bit. Rows come back in input order (`preserve_order`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from cluster.runtime.ray_setup import quiet_ray_data
from training.retrieval.gallery_index import ChunkEncoder, ChunkResult, GalleryItem


class _ChunkEncoderActor:
    """A Ray Data actor: the bundle's gallery encoder, loaded once per actor (`for_bundle` sets which)."""

    bundle = ""
    device = "cpu"

    def __init__(self) -> None:
        from training.retrieval.bundle import load_bundle

        self.retriever = load_bundle(self.bundle, device=self.device, verify=False)

    @classmethod
    def for_bundle(cls, bundle: str, device: str) -> type:
        """A subclass bound to one bundle: Ray ships it with the class, so no constructor arguments go through the
        object store (which Ray warns about for restartable actors)."""
        return type(cls.__name__, (cls,), {"bundle": bundle, "device": device})

    def __call__(self, row: dict) -> dict:
        from training.retrieval.gallery_index import encode_chunk

        chunk = [GalleryItem(image_id, path) for image_id, path in zip(row["ids"], row["paths"])]
        result = encode_chunk(self.retriever, chunk)
        return {
            "chunk": row["chunk"],
            "ids": json.dumps(result.ids),
            "paths": json.dumps(result.paths),
            "skipped": json.dumps(result.skipped),
            "embeddings": np.ascontiguousarray(result.embeddings, dtype=np.float32).tobytes(),
            "rows": result.embeddings.shape[0],
        }


def ray_encoder(bundle: str | Path, workers: int, embed_dim: int, use_gpu: bool) -> ChunkEncoder:
    """A `ChunkEncoder` that maps chunks over `workers` Ray Data actors (call after `cluster.runtime.ray_setup.connect`)."""
    import ray

    quiet_ray_data(preserve_order=True)  # one tqdm bar for the whole build (build_index)

    def encode(chunks: Sequence[Sequence[GalleryItem]]) -> Iterator[ChunkResult]:
        rows = [
            {"chunk": number, "ids": [item.id for item in chunk], "paths": [item.path for item in chunk]}
            for number, chunk in enumerate(chunks)
        ]
        dataset = ray.data.from_items(rows, override_num_blocks=len(rows)).map(
            _ChunkEncoderActor.for_bundle(str(bundle), "cuda" if use_gpu else "cpu"),
            compute=ray.data.ActorPoolStrategy(size=max(1, min(workers, len(rows)))),
            num_gpus=1 if use_gpu else 0,
            num_cpus=0 if use_gpu else 1,
        )
        for expected, row in enumerate(dataset.iter_rows()):
            if row["chunk"] != expected:  # preserve_order makes this impossible; never write a shard out of order
                raise RuntimeError(f"Ray Data returned chunk {row['chunk']} where {expected} was due")
            embeddings = np.frombuffer(row["embeddings"], dtype=np.float32).reshape(int(row["rows"]), embed_dim)
            yield ChunkResult(
                json.loads(row["ids"]), json.loads(row["paths"]), embeddings.copy(), json.loads(row["skipped"])
            )

    return encode


def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0
