"""Small checkpoint pieces (a JSON state and a file) for the checkpointer tests."""

from __future__ import annotations

from pathlib import Path


class _Counter:
    """A JSON piece for the checkpointer tests."""

    def __init__(self, value: int = 0) -> None:
        self.value = value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


class _TextFile:
    """A file piece: writes one file on rank 0 and reads it back."""

    def __init__(self, text: str = "") -> None:
        self.text = text

    def save(self, directory: Path, rank: int) -> None:
        if rank == 0:
            (directory / "piece.txt").write_text(self.text)

    def load(self, directory: Path) -> None:
        self.text = (directory / "piece.txt").read_text()
