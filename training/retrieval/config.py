"""Config section `index`: how `launch/index.py` embeds a gallery and which vector index it builds."""

from __future__ import annotations

from dataclasses import dataclass

INDEX_KINDS = ("flat", "ivf", "hnsw")


@dataclass
class IndexConfig:
    """Gallery indexing and search (`launch/index.py`, `launch/search.py`, `launch/serve.py`)."""

    kind: str = "flat"
    """`flat`: exact inner product (any gallery a machine's memory holds); `ivf` (inverted lists) or `hnsw`
    (graph): approximate, for galleries in the millions."""
    shard_size: int = 4096
    """Images per embedding shard: the unit a resumed build skips."""
    batch_size: int = 64
    """Images per encoder call. Fixed per build, so a Ray build and a single-process build compute the same
    batches and agree bit for bit."""
    workers: int = 2
    """Ray Data encoder actors (one GPU each when GPUs exist); 0 encodes in this process without Ray."""
    nlist: int = 0
    """IVF: inverted lists; 0 picks 4·sqrt(N) (at least 1, at most N / 39 so that each list trains)."""
    nprobe: int = 0
    """IVF: lists visited per query; 0 picks nlist / 4."""
    hnsw_m: int = 32
    """HNSW: graph neighbours per vector."""
    ef_construction: int = 160
    """HNSW: candidate list while building."""
    ef_search: int = 256
    """HNSW: candidate list while searching (recall against speed)."""
    top_k: int = 20
    """Results per query, unless the command line says otherwise."""

    def __post_init__(self) -> None:
        if self.kind not in INDEX_KINDS:
            raise ValueError(f"index.kind={self.kind!r} must be one of {INDEX_KINDS}")
        if self.shard_size < 1 or self.batch_size < 1:
            raise ValueError("index.shard_size and index.batch_size must be >= 1")
        if self.shard_size % self.batch_size:
            raise ValueError(
                f"index.shard_size={self.shard_size} must be a multiple of index.batch_size={self.batch_size}"
            )
        if self.workers < 0 or self.nlist < 0 or self.nprobe < 0:
            raise ValueError("index.workers, index.nlist and index.nprobe must be >= 0")
        if self.hnsw_m < 2 or self.ef_construction < 1 or self.ef_search < 1 or self.top_k < 1:
            raise ValueError("index.hnsw_m must be >= 2; index.ef_construction, ef_search and top_k >= 1")
