"""One search result: what the CLI prints, the batch JSONL holds, the contact sheet draws and the server returns."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Hit:
    """A gallery image ranked for a query."""

    rank: int
    """1-based position in the ranking."""
    id: str
    """The image's id in the index (a benchmark image name, or its path relative to the indexed folder)."""
    path: str
    """The image file as it was indexed."""
    score: float
    """Cosine similarity of the query and gallery embeddings (both L2-normalised)."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
