"""Image pairs mined from an unpaired collection: each image with up to k of its nearest neighbours in a gallery
index whose similarity falls inside a band (related, but not near-duplicates), chosen with a seeded generator."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from tqdm import tqdm

from shards.generate.compose import pair_rng
from shards.generate.config import MiningConfig
from shards.generate.pairs import Pair
from training.retrieval.gallery_index import GalleryIndex, read_shards

_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")
_BATCH = 1024


def mine_pairs(config: MiningConfig, progress: bool = True) -> list[tuple[Pair, float]]:
    """(pair, cosine similarity) for every image of `config.index` and each neighbour chosen for it.

    Raises:
        GalleryIndexError: `config.index` is not a finished index.
    """
    index = GalleryIndex.open(config.index)
    _, _, embeddings, _ = read_shards(index.directory, int(index.manifest["shards"]))
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    mined = []
    for begin in tqdm(range(0, len(index.ids), _BATCH), desc="mining pairs", unit="batch", disable=not progress):
        ids = index.ids[begin : begin + _BATCH]
        rows = index.search(embeddings[begin : begin + _BATCH], config.candidates, exclude=[[i] for i in ids])
        for image_id, path, hits in zip(ids, index.paths[begin : begin + _BATCH], rows):
            band = [hit for hit in hits if config.min_similarity <= hit.score <= config.max_similarity]
            chosen = pair_rng(config.seed, image_id).sample(band, min(config.k, len(band)))
            for hit in sorted(chosen, key=lambda hit: hit.rank):
                pair_id = _SAFE.sub("_", f"{image_id}__{hit.id}")
                mined.append((Pair(pair_id, str(Path(path).resolve()), str(Path(hit.path).resolve())), hit.score))
    return mined
