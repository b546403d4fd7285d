"""Image pairs mined from an unpaired collection: each image with up to k of its nearest neighbours in a gallery
index whose similarity falls inside a band (related, but not near-duplicates), chosen with a seeded generator."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from shards.generate.compose import pair_rng
from shards.generate.config import MiningConfig
from shards.generate.pairs import Pair, pair_ids
from training.retrieval.gallery_index import GalleryIndex, read_shards

_BATCH = 1024


def mine_pairs(config: MiningConfig, progress: bool = True) -> list[tuple[Pair, float]]:
    """(pair, cosine similarity) for every image of `config.index` and each neighbour chosen for it.

    Raises:
        GalleryIndexError: `config.index` is not a finished index.
    """
    index = GalleryIndex.open(config.index)
    _, _, embeddings, _ = read_shards(index.directory, int(index.manifest["shards"]))
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    chosen_pairs: list[tuple[str, str, str, float]] = []
    for begin in tqdm(range(0, len(index.ids), _BATCH), desc="mining pairs", unit="batch", disable=not progress):
        ids = index.ids[begin : begin + _BATCH]
        rows = index.search(embeddings[begin : begin + _BATCH], config.candidates, exclude=[[i] for i in ids])
        for image_id, path, hits in zip(ids, index.paths[begin : begin + _BATCH], rows):
            band = [hit for hit in hits if config.min_similarity <= hit.score <= config.max_similarity]
            chosen = pair_rng(config.seed, image_id).sample(band, min(config.k, len(band)))
            for hit in sorted(chosen, key=lambda hit: hit.rank):
                chosen_pairs.append((f"{image_id}__{hit.id}", path, hit.path, hit.score))
    ids = pair_ids([raw for raw, _, _, _ in chosen_pairs])
    return [
        (Pair(pair_id, str(Path(reference).resolve()), str(Path(target).resolve())), score)
        for pair_id, (_, reference, target, score) in zip(ids, chosen_pairs)
    ]
