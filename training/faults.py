"""Fault injection for the recovery tests: one worker SIGKILLs itself once, at a chosen step and phase.

Environment (read on the workers; `cluster/` forwards them from the driver):

    CONTEXT_CIR_FAULT_KILL_AT_STEP   optimizer step at which to die (unset: never)
    CONTEXT_CIR_FAULT_PHASE          `step` (right after the step, before any checkpoint; default) or
                                     `checkpoint` (while writing that step's checkpoint: every piece written,
                                     the COMPLETE marker not yet)
    CONTEXT_CIR_FAULT_RANK           which rank dies (default 0)

The fault fires once per run: a marker file `<run_dir>/fault_injected` records it before the kill, so the
worker group Ray restarts runs through the same step unharmed.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

logger = logging.getLogger(__name__)

KILL_AT_STEP = "CONTEXT_CIR_FAULT_KILL_AT_STEP"
PHASE = "CONTEXT_CIR_FAULT_PHASE"
RANK = "CONTEXT_CIR_FAULT_RANK"
ENV_VARS = (KILL_AT_STEP, PHASE, RANK)
MARKER = "fault_injected"


def maybe_kill(phase: str, step: int, rank: int, run_dir: str | Path) -> None:
    """SIGKILL this process when the fault variables name this phase, step and rank and it has not fired yet."""
    target = os.environ.get(KILL_AT_STEP)
    if not target or int(target) != step or os.environ.get(PHASE, "step") != phase:
        return
    if int(os.environ.get(RANK, "0")) != rank:
        return
    marker = Path(run_dir) / MARKER
    if marker.exists():
        return
    with open(marker, "w") as handle:
        handle.write(f"rank {rank} killed at step {step} ({phase})\n")
        handle.flush()
        os.fsync(handle.fileno())
    logger.warning("fault injection: rank %d SIGKILLs itself at step %d (%s)", rank, step, phase)
    os.kill(os.getpid(), signal.SIGKILL)
