"""`TrainState`: a run's progress, one of the checkpoint's pieces."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass
class TrainState:
    """Progress of a run: what `trainer_state.json` records under `train`."""

    step: int = 0
    """Optimizer steps taken (skipped ones included: they consumed their batches)."""
    samples_seen: int = 0
    """Triplets consumed over all ranks."""
    skipped_steps: int = 0
    """Steps skipped because the loss or a gradient was non-finite on some rank."""
    consecutive_skips: int = 0
    """Skipped steps in a row up to `step`."""
    data_digest: str = ""
    """Digest of every sample key every rank consumed up to `step`, extended at each checkpoint: two runs that
    saw the same data in the same order have equal digests (checkpoints from before it existed start from "")."""

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the fields `state` holds; fields an older checkpoint lacks keep their defaults."""
        unknown = set(state) - {field.name for field in fields(self)}
        if unknown:
            raise ValueError(f"train state has unknown fields {sorted(unknown)}")
        for name, value in state.items():
            setattr(self, name, value)
