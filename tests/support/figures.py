"""Measurements tests report (peak memory, wall times): printed in the run's summary, never asserted on."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
FIGURES: list[str] = []
