"""The embedded synthetic composed-image-retrieval benchmark (DESIGN section 9).

Procedural scenes of coloured shapes, captions asking for multi-attribute edits, image sets of six for subset
recall, written in CIRR's exact on-disk layout with PTB trees and object boxes, so the real readers, shard
builder and evaluator run on it unchanged. `generate` (in `benchmark.py`) is deterministic for a seed, byte for byte.
The `binding` split (`binding.py`) adds queries whose hard negative is the same edit applied to the wrong object.
"""

from shards.synthetic.benchmark import DEFAULT_CANVAS, DEFAULT_TRIPLETS, SyntheticSummary, generate
from shards.synthetic.binding import DEFAULT_BINDING_TRIPLETS, add_binding
from shards.synthetic.cirr_files import MARKER
from shards.synthetic.scenes import SceneSpec

__all__ = [
    "DEFAULT_BINDING_TRIPLETS",
    "DEFAULT_CANVAS",
    "DEFAULT_TRIPLETS",
    "MARKER",
    "SceneSpec",
    "SyntheticSummary",
    "add_binding",
    "generate",
]
