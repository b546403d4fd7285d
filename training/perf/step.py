"""`launch/bench.py step`: one training step's forward + backward, variants timed side by side in one run.

(a) Text-CC path: ours (fused attention, NP columns from the log-sum-exp, one batched short-NP pass over the
    reused reference tokens) against the released code's (eager attention weights at 77 tokens, the whole model
    re-run per NP; `training.perf.released_cc`).
(b) Fusion attention: ours with `fused` against the same step with `eager` attention.

The model is built from the config with random weights (ContextTiny for configs/tiny.yaml) and fed a synthetic
batch of `train.micro_batch` triplets with `nps` noun phrases per caption. Variants alternate inside every repeat,
so machine load hits them alike; each variant's fastest of `repeats` is reported (timeit's convention: on a shared
machine the fastest run is the one least disturbed by other work; with other jobs on the cores, OMP_NUM_THREADS=1
avoids OpenMP threads waiting on each other and gives far steadier CPU figures). On CUDA the step runs under bf16 autocast and
the result adds triplets/s, peak memory and MFU from an analytic FLOP count.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from typing import Any

import torch
from tqdm import tqdm

from shards.model_inputs import image_size
from training.model.batch_layout import BatchLayout
from training.model.context_cir import build_model
from training.monitor.mfu import StepShape, peak_bf16_flops, step_flops
from training.objectives.context_cir import ConTextObjective
from training.perf.released_cc import released_step_outputs
from training.trainer.job import TrainJob

logger = logging.getLogger(__name__)
SOT, EOT = 49406, 49407


def synthetic_batch(
    batch_size: int, nps: int, max_nps: int, np_length: int, size: int, device: torch.device, seed: int = 0
) -> dict[str, Any]:
    """A reader-shaped batch: random uint8 images (as the reader hands them over, normalised in the model on the
    device), captions of 3*nps+4 (at least 24) BPE tokens, `nps` spans of 1-3."""
    generator = torch.Generator().manual_seed(seed)
    length = max(24, 3 * nps + 4)
    nps = min(nps, max_nps)
    caption_ids = torch.zeros(batch_size, 77, dtype=torch.long)
    caption_ids[:, 0] = SOT
    caption_ids[:, 1 : length + 1] = torch.randint(1, 49400, (batch_size, length), generator=generator)
    caption_ids[:, length + 1] = EOT
    spans = torch.zeros(batch_size, max_nps, 2, dtype=torch.long)
    np_ids = torch.zeros(batch_size, max_nps, np_length, dtype=torch.long)
    widths = torch.randint(1, 4, (batch_size, nps), generator=generator)
    starts = (torch.rand(batch_size, nps, generator=generator) * (length - widths + 1)).long() + 1
    spans[:, :nps, 0], spans[:, :nps, 1] = starts, starts + widths
    for sample in range(batch_size):
        for slot in range(nps):
            start, end = spans[sample, slot].tolist()
            np_ids[sample, slot, 0] = SOT
            np_ids[sample, slot, 1 : 1 + end - start] = caption_ids[sample, start:end]
            np_ids[sample, slot, 1 + end - start] = EOT
    batch = {
        "reference_image": torch.randint(0, 256, (batch_size, 3, size, size), generator=generator, dtype=torch.uint8),
        "target_image": torch.randint(0, 256, (batch_size, 3, size, size), generator=generator, dtype=torch.uint8),
        "caption_ids": caption_ids,
        "np_spans": spans,
        "np_mask": torch.arange(max_nps).expand(batch_size, max_nps) < nps,
        "np_ids": np_ids,
    }
    # The sizes the forward reads, taken on the host as the training loop does (no host syncs in the step).
    layout = BatchLayout.of_batch(batch)
    return {**{name: value.to(device) for name, value in batch.items()}, "layout": layout.to(device)}


def build_objective(config: TrainJob, device: torch.device) -> ConTextObjective:
    """The config's network at its real dimensions with random weights (no hub), fused attention, on `device`."""
    model_config = dataclasses.replace(
        config.model, pretrained=None, weights_file=None, init_from=None, compile=False, attention="fused"
    )
    if device.type == "cuda":
        # Random init on the GPU itself: seconds for ViT-H, where the CPU's initialisers take tens of seconds.
        torch.manual_seed(config.train.seed)
        try:
            with torch.device(device):
                model = build_model(model_config, device)
                return ConTextObjective(model_config, config.loss, model=model).to(device)
        except (RuntimeError, TypeError) as error:  # some initialiser that cannot run on the device
            logger.warning("building on %s failed (%s); building on the CPU instead", device, error)
    torch.manual_seed(config.train.seed)
    return ConTextObjective(model_config, config.loss).to(device)


def benchmark_batch(config: TrainJob, nps: int, device: torch.device, batch_size: int | None = None) -> dict[str, Any]:
    """A synthetic reader batch of the config's micro-batch (or `batch_size`) with `nps` phrases per caption."""
    noun_phrases = config.data.noun_phrases
    return synthetic_batch(
        batch_size or config.train.micro_batch,
        nps,
        noun_phrases.max_nps,
        noun_phrases.np_length,
        image_size(config.model.backbone),
        device,
    )


def timed_step(objective: ConTextObjective, step, batch: dict[str, Any], device: torch.device) -> float:
    """Seconds of one forward + backward of `step(batch)` (bf16 autocast on CUDA), the device synchronised."""
    objective.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        outputs = step(batch)
        loss = sum(value for name, value in outputs.items() if name.endswith("_loss"))
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # kernels are asynchronous: wait before reading the clock
    return time.perf_counter() - started


def compare_variants(
    config: TrainJob, objective: ConTextObjective, batch: dict[str, Any], device: torch.device, repeats: int
) -> dict[str, Any]:
    """Efficient vs released-code Text-CC and fused vs eager attention on one batch, alternating, fastest of each."""

    def eager(batch) -> dict[str, torch.Tensor]:
        objective.model.eager = True
        try:
            return objective(batch)
        finally:
            objective.model.eager = False

    variants = {
        "efficient": objective,
        "reference": lambda batch: released_step_outputs(objective, batch),
        "eager": eager,
    }
    for step in variants.values():
        timed_step(objective, step, batch, device)  # warm-up: allocator, kernel selection, lazy initialisation
    timings: dict[str, list[float]] = {name: [] for name in variants}
    nps = int(batch["np_mask"].sum(dim=1).max())
    for _ in tqdm(range(repeats), desc=f"{config.model.backbone} step, {nps} NPs", unit="repeat", leave=False):
        for name, step in variants.items():
            timings[name].append(timed_step(objective, step, batch, device))
    fastest = {name: min(values) for name, values in timings.items()}
    row: dict[str, Any] = {
        "nps": nps,
        "cc_efficient_s": fastest["efficient"],
        "cc_reference_s": fastest["reference"],
        "cc_ratio": fastest["efficient"] / fastest["reference"],
        "attn_fused_s": fastest["efficient"],
        "attn_eager_s": fastest["eager"],
        "attn_ratio": fastest["efficient"] / fastest["eager"],
        # The GPU-only figures are there (null) on a CPU too: a dry run's report has a GPU run's layout.
        **dict.fromkeys(("triplets_per_s", "peak_mem_gb", "step_tflops", "mfu")),
    }
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        timed_step(objective, objective, batch, device)
        flops = step_flops(objective.model, StepShape.of(batch), text_cc=objective.lambda_cc > 0)
        peak = peak_bf16_flops(torch.cuda.get_device_name(device), config.logging.peak_tflops)
        row.update(
            triplets_per_s=batch["caption_ids"].shape[0] / fastest["efficient"],
            peak_mem_gb=torch.cuda.max_memory_allocated(device) / 2**30,
            step_tflops=flops / 1e12,
            mfu=flops / fastest["efficient"] / peak if peak else None,
        )
    return row


def step_benchmark(config: TrainJob, repeats: int, nps: list[int]) -> dict[str, Any]:
    """Time forward + backward of one training step for each variant and noun-phrase count; see the module docstring.

    Returns:
        `by_nps`: for each count of noun phrases per caption, cc_efficient_s, cc_reference_s, cc_ratio (efficient /
        reference), attn_fused_s, attn_eager_s, attn_ratio (fused / eager) and, on CUDA, triplets_per_s,
        peak_mem_gb, step_tflops and mfu; `attn_fused_s` is the efficient step itself. Also device, backbone,
        batch_size, repeats, threads.
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    objective = build_objective(config, device)
    rows = [
        compare_variants(config, objective, benchmark_batch(config, count, device), device, repeats) for count in nps
    ]
    return {
        "by_nps": rows,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "backbone": config.model.backbone,
        "batch_size": config.train.micro_batch,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions of each variant")
    parser.add_argument(
        "--nps",
        type=lambda text: [int(part) for part in text.split(",")],
        default=[3, 10],
        help="noun phrases per caption, comma-separated counts (default 3,10: the synthetic data's ~3 and max_nps)",
    )


def run(config: TrainJob, args: argparse.Namespace) -> dict[str, Any]:
    return step_benchmark(config, repeats=args.repeats, nps=args.nps)
