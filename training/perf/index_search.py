"""`launch/bench.py index`: build and query time of the exact and approximate vector indexes, and their recall.

Random unit vectors (uniform on the sphere, the hardest case for approximate search: no cluster structure to
exploit) are indexed flat, IVF and HNSW with the `index` section's settings. Each approximate index reports
recall@k against the exact top-k of the same queries; IVF is also measured at other `nprobe` values, since its
recall on structureless data depends on the share of lists visited.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from typing import Any

import numpy as np

from training.retrieval.config import IndexConfig
from training.retrieval.gallery_index import build_vector_index


def random_unit_vectors(count: int, dim: int, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((count, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def recall_against(exact: np.ndarray, found: np.ndarray) -> float:
    """Mean share of each query's exact top-k that the approximate top-k also holds."""
    k = exact.shape[1]
    return float(np.mean([len(set(row) & set(other)) / k for row, other in zip(exact, found)]))


def index_benchmark(config: IndexConfig, vectors: int, dim: int, queries: int, k: int, seed: int = 0) -> dict[str, Any]:
    """Build and query time (s) and recall@k of flat, IVF and HNSW indexes over `vectors` random vectors."""
    gallery, probe = random_unit_vectors(vectors, dim, seed), random_unit_vectors(queries, dim, seed + 1)
    results: dict[str, Any] = {"vectors": vectors, "dim": dim, "queries": queries, "k": k}
    exact = None
    for kind in ("flat", "ivf", "hnsw"):
        started = time.perf_counter()
        index, params = build_vector_index(gallery, dataclasses.replace(config, kind=kind))
        built = time.perf_counter()
        _, found = index.search(probe, k)
        searched = time.perf_counter()
        exact = found if kind == "flat" else exact
        entry = {"params": params, "build_s": round(built - started, 3), "query_s": round(searched - built, 4)}
        if kind != "flat":
            entry["recall"] = round(recall_against(exact, found), 4)
        if kind == "ivf":
            sweep = {}
            for share in (8, 4, 2):
                index.nprobe = max(1, params["nlist"] // share)
                started = time.perf_counter()
                _, found = index.search(probe, k)
                sweep[f"nprobe={index.nprobe}"] = {
                    "recall": round(recall_against(exact, found), 4),
                    "query_s": round(time.perf_counter() - started, 4),
                }
            entry["nprobe_sweep"] = sweep
        results[kind] = entry
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vectors", type=int, default=100_000, help="gallery size (default 100000)")
    parser.add_argument("--dim", type=int, default=64, help="embedding width (default 64, the tiny model's)")
    parser.add_argument("--queries", type=int, default=1000, help="queries (default 1000)")
    parser.add_argument("-k", type=int, default=10, help="top-k compared with the exact index (default 10)")


def run(config, args: argparse.Namespace) -> dict[str, Any]:
    return index_benchmark(config.index, args.vectors, args.dim, args.queries, args.k)
