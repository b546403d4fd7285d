"""The eval job's gallery rates for `launch/bench.py gpu`: decoding and encoding measured apart.

Timing `encode_gallery` on a small gallery measures mostly its DataLoader: each call starts fresh decoding workers,
and a few batches of ~5 ms decodes per image hide the GPU. Here the two are separate figures:
- decoding: the eval job's uint8 transform in `workers` persistent DataLoader workers, timed over a second pass of
  the gallery (the first, with the workers' start-up, is reported beside it);
- encoding: at least `batches` batches of already-decoded images, as `encode_gallery` runs each one: the copy to
  the device (uint8 pixels), their normalisation on the device, the image tower and gallery embedding under bf16
  autocast, the embeddings' normalisation, the copy back to the host.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from shards.model_inputs import uint8_transform
from training.checkpoint import layout
from training.config_loader import load_section
from training.evaluation.benchmarks import BENCHMARKS
from training.evaluation.config import EvalConfig
from training.evaluation.encode import ImageFiles, autocast
from training.evaluation.methods import METHODS
from training.evaluation.methods.base import GalleryBatch
from training.evaluation.runner import load_checkpoint_model

Record = Callable[[str, Any], None]


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _decoded(loader: DataLoader) -> tuple[torch.Tensor, float]:
    """Every image of one pass through `loader`, and the pass's seconds."""
    started = time.perf_counter()
    chunks = [pixels for pixels, _ in loader]
    return torch.cat(chunks), time.perf_counter() - started


@torch.no_grad()
def measure_eval_encode(
    run_dir: Path, device: torch.device, record: Record, batches: int = 20, workers: int | None = None
) -> None:
    """Decoding and encoding rates of the synthetic val gallery with the run's latest checkpoint.

    Args:
        run_dir: a training run with a complete checkpoint whose config names the synthetic benchmark.
        batches: encoded batches timed (they cycle over the gallery when it has fewer).
        workers: decoding processes; the checkpoint's `eval` section decides by default.
    """
    step, checkpoint = layout.latest_complete(run_dir)
    eval_config = load_section(checkpoint / layout.CONFIG, "eval", EvalConfig)
    (split,) = BENCHMARKS.get("synthetic").scored_splits(eval_config.dataset("synthetic"), ["val"])
    model, model_config = load_checkpoint_model(checkpoint, device)
    paths = [split.image_paths[name] for name in split.gallery]
    batch_size = eval_config.batch_size
    workers = eval_config.workers_for(device) if workers is None else workers
    record("checkpoint_step", step)
    record("gallery_images", len(paths))

    loader = DataLoader(
        ImageFiles(paths, uint8_transform(model_config.backbone)),  # as the eval job decodes
        batch_size=batch_size,
        num_workers=workers,
        persistent_workers=workers > 0,  # the second pass reuses the started workers
    )
    pixels, first_pass_s = _decoded(loader)
    _, warm_pass_s = _decoded(loader)
    del loader  # stops the workers
    record(
        "decode",
        {
            "workers": workers,
            "images_per_s": len(paths) / warm_pass_s,
            "first_pass_s": first_pass_s,
            "warm_pass_s": warm_pass_s,
        },
    )

    method = METHODS.get("context")
    distinct = max(1, math.ceil(len(paths) / batch_size))
    host_batches = [pixels[torch.arange(i * batch_size, (i + 1) * batch_size) % len(paths)] for i in range(distinct)]
    if device.type == "cuda":
        host_batches = [batch.pin_memory() for batch in host_batches]  # as the eval loader hands them over

    def encode(index: int) -> torch.Tensor:
        images = host_batches[index % distinct].to(device, non_blocking=True)
        with autocast(device):
            embedding = method.encode_gallery(GalleryBatch(model, images, None))
        return torch.nn.functional.normalize(embedding.float(), dim=-1).cpu()

    for index in range(2):  # warm-up: kernel selection, allocator
        encode(index)
    _synchronise(device)
    started = time.perf_counter()
    for index in range(batches):
        encode(index)
    _synchronise(device)
    seconds = time.perf_counter() - started
    record(
        "encode",
        {
            "batches": batches,
            "batch_size": batch_size,
            "images": batches * batch_size,
            "seconds": seconds,
            "images_per_s": batches * batch_size / seconds,
        },
    )
