"""The preflight of `launch/bench.py gpu`: what would waste the one GPU run, checked in seconds before it starts.

A GPU is lent for minutes, perhaps once. Each check below turns a way of losing that window into one line and a
non-zero exit before any model is built:
- CUDA is usable. An old driver makes `torch.cuda.is_available()` False; the bench must not fall back to its CPU
  dry run then (only `--dry-run` gives that), and the line names the driver and the CUDA torch was built for.
- Free `/dev/shm` covers what the DataLoaders hold: workers x prefetched batches x batch bytes. A container's
  default 64 MiB turns that into a bus error in the middle of the training part.
- Free GPU memory: another process on the card would cost the large steps and skew every figure.
- The local Ray sees the GPU: otherwise the training part waits for a GPU worker that never starts.

Nothing here imports ray or deepspeed in this process: Ray reads its authentication settings once, at import, and
`cluster.runtime.ray_setup.connect` must set them first; deepspeed prints a line of its own at import.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PREFLIGHT_EXIT = 3
"""Exit code of `launch/bench.py gpu` when a preflight check fails (2 is a usage or config error)."""
SHM = Path("/dev/shm")
TRAIN_PREFETCH = 4
"""Batches each training loader worker keeps ready (`shards.stream.reader`: `prefetch_factor=4`)."""
EVAL_PREFETCH = 2
"""torch's default `prefetch_factor`, which the eval loader keeps."""
PIXEL_BYTES = 1
"""Bytes per pixel channel in the loaders' batches: uint8 (`shards.model_inputs.uint8_transform`), normalised by the
model on the GPU."""
SHM_MARGIN = 1.25
"""Headroom over the estimate: pinned copies, the index, a batch being collated."""
RAY_PROBE_TIMEOUT_S = 30.0


class PreflightFailed(RuntimeError):
    """A check failed; the message is one line that says what and what to do."""


@dataclass(frozen=True)
class LoaderNeeds:
    """Shared memory one DataLoader holds at most: every worker's prefetched batches sit in /dev/shm."""

    name: str
    workers: int
    prefetch: int
    batch_bytes: int

    @property
    def bytes(self) -> int:
        return self.workers * self.prefetch * self.batch_bytes

    def describe(self) -> str:
        return (
            f"{self.name}: {self.workers} workers x {self.prefetch} batches x {self.batch_bytes / 2**20:.1f} MiB "
            f"= {self.bytes / 2**30:.2f} GiB"
        )


def image_batch_bytes(batch: int, images_per_sample: int, size: int, bytes_per_value: int = PIXEL_BYTES) -> int:
    """Bytes of one batch of decoded images (uint8 by default: the reader's and the eval loader's dtype)."""
    return batch * images_per_sample * 3 * size * size * bytes_per_value


def _cuda_usable() -> tuple[bool, str]:
    """(usable, why not): torch's availability, with the warning an old driver raises kept for the message."""
    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            available = torch.cuda.is_available() and torch.cuda.device_count() > 0
            if available:
                torch.zeros(1, device="cuda").add_(1)  # creates the context: fails here, not in the first section
        except (RuntimeError, AssertionError) as error:
            return False, str(error).splitlines()[0] if str(error) else type(error).__name__
    if available:
        return True, ""
    said = [str(warning.message).splitlines()[0] for warning in caught]
    return False, said[0] if said else "torch.cuda.is_available() is False"


def driver_version() -> str | None:
    """The NVIDIA driver version `nvidia-smi` reports, None without `nvidia-smi` (or when it fails)."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=15,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (nvidia-smi did not answer)"
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        first = (done.stderr or done.stdout).strip().splitlines()
        return f"unknown (nvidia-smi: {first[0] if first else f'exit {done.returncode}'})"
    return lines[0].strip()


def check_cuda() -> dict[str, Any]:
    """The device, driver and CUDA versions; raises `PreflightFailed` when CUDA is not usable."""
    import torch

    usable, why = _cuda_usable()
    driver = driver_version()
    if not usable:
        if driver is None:
            raise PreflightFailed(
                f"no usable GPU: nvidia-smi not found and torch {torch.__version__} (CUDA {torch.version.cuda}) sees "
                "no CUDA device; `--dry-run` runs the tiny CPU dry run"
            )
        raise PreflightFailed(
            f"CUDA not usable: NVIDIA driver {driver}, torch {torch.__version__} built for CUDA {torch.version.cuda} "
            f"({why}); a driver too old for that CUDA needs a torch build for an older CUDA"
        )
    properties = torch.cuda.get_device_properties(0)
    return {
        "device": properties.name,
        "gpus": torch.cuda.device_count(),
        "capability": f"{properties.major}.{properties.minor}",
        "driver": driver,
        "torch_cuda": torch.version.cuda,
        "gpu_memory_gb": round(properties.total_memory / 2**30, 1),
    }


def check_gpu_memory(min_free_gb: float) -> dict[str, Any]:
    """Free memory of GPU 0; raises `PreflightFailed` below `min_free_gb`."""
    import torch

    free, total = torch.cuda.mem_get_info(0)
    if free < min_free_gb * 2**30:
        raise PreflightFailed(
            f"GPU memory: {free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB (another process holds the rest?); "
            f"the bench needs {min_free_gb:g} GiB (--min-free-gpu-gb)"
        )
    return {"gpu_free_gb": round(free / 2**30, 1), "gpu_other_processes_gb": round((total - free) / 2**30, 1)}


def check_shm(needs: list[LoaderNeeds], path: Path = SHM) -> dict[str, Any]:
    """Free shared memory against the largest loader (they run one after the other); raises `PreflightFailed`."""
    largest = max(needs, key=lambda need: need.bytes)
    needed = int(largest.bytes * SHM_MARGIN)
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        free = 0
    if free < needed:
        raise PreflightFailed(
            f"{path}: {free / 2**30:.2f} GiB free, the loaders need about {needed / 2**30:.2f} GiB "
            f"({largest.describe()}, +{SHM_MARGIN - 1:.0%}); start the container with a larger --shm-size "
            f"(e.g. {max(2, 2 * round(needed / 2**30 + 0.5))}g), or lower --loader-workers"
        )
    return {"shm_free_gb": round(free / 2**30, 2), "shm_needed_gb": round(needed / 2**30, 2)}


_RAY_PROBE = """
import json
from ray._private.resource_and_label_spec import ResourceAndLabelSpec
manager, count = ResourceAndLabelSpec._get_current_node_accelerator(None, {})
name = manager.get_resource_name() if manager is not None else None
print(json.dumps({"resource": name, "count": count or 0}))
"""


def check_ray_gpu() -> dict[str, Any]:
    """How many GPUs a local Ray started here would offer; raises `PreflightFailed` at none.

    It asks Ray's own accelerator detection (what `ray.init` runs) in a child process, so this process imports no
    ray before `connect` sets its authentication. A run that joins a cluster (`RAY_ADDRESS`) is not checked here.
    """
    if os.environ.get("RAY_ADDRESS"):
        return {"ray_gpus": f"not checked: joining RAY_ADDRESS={os.environ['RAY_ADDRESS']}"}
    try:
        done = subprocess.run(
            [sys.executable, "-c", _RAY_PROBE], capture_output=True, text=True, timeout=RAY_PROBE_TIMEOUT_S
        )
        found = json.loads(done.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.TimeoutExpired, json.JSONDecodeError, IndexError) as error:
        # Ray's private detection API moved: say so in the report, and let the training part's wait decide.
        return {"ray_gpus": f"not checked ({type(error).__name__})"}
    if found["resource"] != "GPU" or found["count"] < 1:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise PreflightFailed(
            f"a local Ray would see {found['count']} GPU(s) (CUDA_VISIBLE_DEVICES={visible!r}, Ray detects GPUs "
            "through NVML): the training part would wait for a GPU worker that never starts"
        )
    return {"ray_gpus": found["count"]}


def preflight(needs: Callable[[], list[LoaderNeeds]], dry_run: bool, min_free_gpu_gb: float) -> dict[str, Any]:
    """Every check, cheapest and likeliest to fail first; the figures they read go into the report.

    Args:
        needs: the loaders' shared-memory needs (called after the CUDA checks: it reads model configs).
        dry_run: the CPU dry run: only /dev/shm is checked.
        min_free_gpu_gb: free GPU memory required.

    Raises:
        PreflightFailed: the first check that fails, in one line.
    """
    started = time.perf_counter()
    found: dict[str, Any] = {}
    if not dry_run:
        found |= check_cuda()
        found |= check_gpu_memory(min_free_gpu_gb)
    loaders = needs()
    found |= check_shm(loaders)
    found["loaders"] = [need.describe() for need in loaders]
    if not dry_run:
        found |= check_ray_gpu()
    found["seconds"] = round(time.perf_counter() - started, 2)
    return found
