"""The embedded synthetic composed-image-retrieval benchmark (DESIGN section 9).

Procedural scenes of coloured shapes, captions asking for multi-attribute edits, image sets of six for subset
recall, written in CIRR's exact on-disk layout with PTB trees and object boxes, so the real readers, shard
builder and evaluator run on it unchanged. `generate` (in `benchmark.py`) is deterministic for a seed, byte for byte.
"""

from shards.synthetic.benchmark import DEFAULT_CANVAS, DEFAULT_TRIPLETS, SyntheticSummary, generate
from shards.synthetic.cirr_files import MARKER
from shards.synthetic.scenes import SceneSpec

__all__ = ["DEFAULT_CANVAS", "DEFAULT_TRIPLETS", "MARKER", "SceneSpec", "SyntheticSummary", "generate"]
