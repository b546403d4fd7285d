"""Per-backbone figures for `launch/bench.py gpu`: speed, memory and the fused kernels' correctness at real size.

For one config's backbone (random init at its real dimensions; no hub is needed) and micro-batch:
- the step comparison of `training.perf.step` at `nps` phrases per caption (efficient vs released-code Text-CC,
  fused vs eager attention; on CUDA triplets/s, MFU and peak memory), in bf16 on a GPU;
- peak memory of one efficient step with and without activation checkpointing;
- fused-vs-eager maximum difference of the concept maps and of every gradient, in fp32 and under bf16 autocast,
  on a small batch: the fused kernels checked on the device they run on.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from training.perf.step import benchmark_batch, build_objective, compare_variants, timed_step
from training.trainer.job import TrainJob


def _peak_memory_gb(objective, batch: dict[str, Any], device: torch.device, checkpointing: bool) -> float | None:
    """Peak device memory of one efficient step (None off CUDA, or when it does not fit)."""
    if device.type != "cuda":
        return None
    objective.model.backbone.set_grad_checkpointing(checkpointing)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    try:
        timed_step(objective, objective, batch, device)
    except torch.OutOfMemoryError:
        return None
    finally:
        objective.zero_grad(set_to_none=True)
    return torch.cuda.max_memory_allocated(device) / 2**30


def fused_vs_eager(objective, batch: dict[str, Any], bf16: bool) -> dict[str, float]:
    """Largest absolute difference between the fused and eager paths: in-context and isolated maps, gradients.

    `grad_max_diff` is over every parameter; `grad_rel_diff` divides it by the largest gradient entry.
    """
    device = batch["caption_ids"].device
    results = {}
    for eager in (False, True):
        objective.zero_grad(set_to_none=True)
        objective.model.eager = eager
        try:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                model_outputs = objective.model(
                    batch["reference_image"],
                    batch["caption_ids"],
                    batch["target_image"],
                    batch["np_spans"],
                    batch["np_mask"],
                    batch["np_ids"],
                )
                loss = model_outputs["fused/query"].float().square().sum() + model_outputs["fused/np_maps"].sum()
            loss.backward()
        finally:
            objective.model.eager = False
        grads = {
            name: p.grad.detach().float().clone() for name, p in objective.named_parameters() if p.grad is not None
        }
        results[eager] = (
            model_outputs["fused/np_maps"].detach().float(),
            model_outputs["fused/np_maps_isolated"],
            grads,
        )
    (fused_maps, fused_isolated, fused_grads), (eager_maps, eager_isolated, eager_grads) = results[False], results[True]
    grad_diff = max(float((fused_grads[name] - eager_grads[name]).abs().max()) for name in fused_grads)
    largest = max(float(grad.abs().max()) for grad in eager_grads.values())
    objective.zero_grad(set_to_none=True)
    return {
        "maps_max_diff": float((fused_maps - eager_maps).abs().max()),
        "isolated_maps_max_diff": float((fused_isolated.float() - eager_isolated.float()).abs().max()),
        "grad_max_diff": grad_diff,
        "grad_rel_diff": grad_diff / max(largest, 1e-30),
    }


def measure_backbone(
    config: TrainJob, device: torch.device, nps: int = 10, repeats: int = 3, check_batch: int = 4
) -> dict[str, Any]:
    """Every per-backbone figure of `launch/bench.py gpu` for `config` (see the module docstring)."""
    started = time.perf_counter()
    objective = build_objective(config, device)
    parameters = sum(p.numel() for p in objective.parameters())
    batch = benchmark_batch(config, nps, device)
    objective.model.backbone.set_grad_checkpointing(config.model.grad_checkpointing)
    figures: dict[str, Any] = {
        "backbone": config.model.backbone,
        "parameters_m": parameters / 1e6,
        "micro_batch": config.train.micro_batch,
        "grad_checkpointing": config.model.grad_checkpointing,
        "step": compare_variants(config, objective, batch, device, repeats),
        "peak_mem_gb_checkpointing": _peak_memory_gb(objective, batch, device, True),
        "peak_mem_gb_no_checkpointing": _peak_memory_gb(objective, batch, device, False),
    }
    objective.model.backbone.set_grad_checkpointing(False)
    small = benchmark_batch(config, nps, device, batch_size=check_batch)
    figures["fused_vs_eager_fp32"] = fused_vs_eager(objective, small, bf16=False)
    figures["fused_vs_eager_bf16"] = fused_vs_eager(objective, small, bf16=device.type == "cuda")
    figures["seconds"] = time.perf_counter() - started
    del objective
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return figures
