"""Where checkpoints live and which ones are complete. Pure path logic: the writer and the eval watcher share it.

    <run_dir>/checkpoints/step_XXXXXXXX/
        model.safetensors     consolidated weights (what eval loads)
        config.yaml           the resolved config
        trainer_state.json    step, samples seen, every rank's reader state, RNG states
        deepspeed/            DeepSpeed engine state (for resume)
        COMPLETE              written last, by atomic rename: only then does anything read the directory
    <run_dir>/checkpoints/latest   the tag of the newest complete checkpoint, replaced atomically

A checkpoint without `COMPLETE` is never loaded. A `latest` that names a missing or incomplete tag is ignored in
favour of the newest complete directory.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

CHECKPOINTS = "checkpoints"
MARKER = "COMPLETE"
LATEST = "latest"
WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"
TRAINER_STATE = "trainer_state.json"
DEEPSPEED = "deepspeed"
_TAG = re.compile(r"^step_(\d{8})$")


def checkpoints_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def checkpoint_tag(step: int) -> str:
    """`step_XXXXXXXX` for an optimizer step."""
    return f"step_{step:08d}"


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return checkpoints_root(run_dir) / checkpoint_tag(step)


def step_of(path: str | Path) -> int | None:
    """The step a checkpoint directory name encodes, or None when it is not a checkpoint name."""
    match = _TAG.match(Path(path).name)
    return int(match.group(1)) if match else None


def is_complete(path: str | Path) -> bool:
    """True when the checkpoint's completeness marker exists (it is written last)."""
    return (Path(path) / MARKER).is_file()


def write_atomically(path: str | Path, text: str) -> None:
    """Write `text` to a temporary sibling, fsync it, then rename it over `path`."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(temporary, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def mark_complete(path: str | Path, summary: str = "") -> None:
    """Publish a fully written checkpoint: the marker appears by atomic rename, so readers see all or nothing."""
    write_atomically(Path(path) / MARKER, summary or "complete\n")


def complete_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Every complete checkpoint of a run as (step, path), oldest first."""
    root = checkpoints_root(run_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        step = step_of(child)
        if step is not None and child.is_dir() and is_complete(child):
            found.append((step, child))
    return sorted(found)


def read_latest_pointer(run_dir: str | Path) -> str | None:
    """The tag `latest` names, or None when the pointer is absent or unreadable."""
    pointer = checkpoints_root(run_dir) / LATEST
    try:
        tag = pointer.read_text().strip()
    except OSError:
        return None
    return tag if _TAG.match(tag) else None


def update_latest_pointer(run_dir: str | Path, step: int) -> None:
    """Point `latest` at a checkpoint that is already complete."""
    path = checkpoint_dir(run_dir, step)
    if not is_complete(path):
        raise RuntimeError(f"refusing to point latest at incomplete checkpoint {path}")
    write_atomically(checkpoints_root(run_dir) / LATEST, checkpoint_tag(step) + "\n")


def latest_complete(run_dir: str | Path) -> tuple[int, Path] | None:
    """The newest complete checkpoint: `latest` when it names a complete one, else the newest complete directory."""
    complete = complete_checkpoints(run_dir)
    if not complete:
        return None
    newest = complete[-1]
    tag = read_latest_pointer(run_dir)
    if tag is not None:
        pointed = checkpoints_root(run_dir) / tag
        step = step_of(pointed)
        # A pointer to an older complete checkpoint can only come from a crash between marker and pointer
        # update; the newest complete directory is still the right one to continue from.
        if step is not None and is_complete(pointed) and step >= newest[0]:
            return step, pointed
    return newest
