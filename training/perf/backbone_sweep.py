"""Per-backbone figures for `launch/bench.py gpu`: speed, memory and the fused kernels' correctness at real size.

For one config's backbone (random init at its real dimensions; no hub is needed) and micro-batch, in the order of
their value, each handed to `record` the moment it exists:
1. the efficient training step (forward + backward of one micro-batch, bf16 autocast on a GPU) with activation
   checkpointing on and off, the config's own mode first: step time, triplets/s, peak memory, MFU;
2. the step comparison of `training.perf.step` at `nps` phrases per caption (efficient vs released-code Text-CC,
   fused vs eager attention);
3. fused-vs-eager maximum difference of the concept maps and of every gradient, in fp32 and under bf16 autocast,
   on a small batch, and both bf16 paths against the fp32 eager reference: under bf16 the eager reference rounds
   its own scores, so fused-vs-eager alone mixes the two paths' errors.

No figure includes the optimizer: peak memory has no AdamW state (`optimizer_state_gb` says what it would add).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import torch

from training.monitor.mfu import StepShape, peak_bf16_flops, step_flops
from training.perf.step import benchmark_batch, build_objective, compare_variants, timed_step
from training.trainer.job import TrainJob

Record = Callable[[str, Any], None]
"""`record(name, value)`: one figure, written to the report at once."""


def _release_memory(objective, device: torch.device) -> None:
    objective.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()


def step_figures(
    config: TrainJob, objective, batch: dict[str, Any], device: torch.device, repeats: int, checkpointing: bool
) -> dict[str, Any]:
    """The efficient step in one activation-checkpointing mode: fastest and median of `repeats`, after a warm-up.

    Returns:
        step_s, step_median_s, triplets_per_s, peak_mem_gb, step_tflops, mfu (GPU-only figures are None on a
        CPU), or `{"out_of_memory": True}` when the step does not fit.
    """
    objective.model.backbone.set_grad_checkpointing(checkpointing)
    _release_memory(objective, device)
    try:
        timed_step(objective, objective, batch, device)  # warm-up: allocator, kernel selection, lazy initialisation
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = [timed_step(objective, objective, batch, device) for _ in range(max(1, repeats))]
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    except torch.OutOfMemoryError:
        return {"out_of_memory": True}
    finally:
        _release_memory(objective, device)
    fastest = min(times)
    host_batch = {name: value.cpu() if torch.is_tensor(value) else value for name, value in batch.items()}
    flops = step_flops(objective.model, StepShape.of(host_batch), text_cc=objective.lambda_cc > 0)
    peak_flops = peak_bf16_flops(torch.cuda.get_device_name(device), config.logging.peak_tflops) if peak else None
    return {
        "step_s": fastest,
        "step_median_s": statistics.median(times),
        "repeats": len(times),
        "triplets_per_s": batch["caption_ids"].shape[0] / fastest,
        "peak_mem_gb": peak,
        "step_tflops": flops / 1e12,
        "mfu": flops / fastest / peak_flops if peak_flops else None,
    }


def _paths_pass(objective, batch: dict[str, Any], eager: bool, bf16: bool) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(in-context maps, isolated maps, every gradient) of one forward + backward through the given path."""
    device = batch["caption_ids"].device
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
                layout=batch.get("layout"),
            )
            loss = model_outputs["fused/query"].float().square().sum() + model_outputs["fused/np_maps"].sum()
        loss.backward()
    finally:
        objective.model.eager = False
    grads = {name: p.grad.detach().float().clone() for name, p in objective.named_parameters() if p.grad is not None}
    objective.zero_grad(set_to_none=True)
    return model_outputs["fused/np_maps"].detach().float(), model_outputs["fused/np_maps_isolated"].float(), grads


def _difference(tested: tuple, reference: tuple) -> dict[str, float]:
    (maps, isolated, grads), (reference_maps, reference_isolated, reference_grads) = tested, reference
    grad_diff = max(float((grads[name] - reference_grads[name]).abs().max()) for name in reference_grads)
    largest = max(float(grad.abs().max()) for grad in reference_grads.values())
    return {
        "maps_max_diff": float((maps - reference_maps).abs().max()),
        "isolated_maps_max_diff": float((isolated - reference_isolated).abs().max()),
        "grad_max_diff": grad_diff,
        "grad_rel_diff": grad_diff / max(largest, 1e-30),
    }


def path_differences(objective, batch: dict[str, Any], bf16: bool) -> dict[str, dict[str, float]]:
    """Largest absolute differences between the fused and eager paths, and of each against fp32 eager.

    `grad_max_diff` is over every parameter; `grad_rel_diff` divides it by the largest reference gradient entry.
    Keys: `fused_vs_eager_fp32`, `fused_vs_eager_bf16`, `fused_bf16_vs_eager_fp32`, `eager_bf16_vs_eager_fp32`
    (the bf16 ones only with `bf16`: autocast to bf16 is for the GPU).
    """
    truth = _paths_pass(objective, batch, eager=True, bf16=False)
    found = {"fused_vs_eager_fp32": _difference(_paths_pass(objective, batch, eager=False, bf16=False), truth)}
    if bf16:
        fused, eager = (_paths_pass(objective, batch, eager=path, bf16=True) for path in (False, True))
        found["fused_vs_eager_bf16"] = _difference(fused, eager)
        found["fused_bf16_vs_eager_fp32"] = _difference(fused, truth)
        found["eager_bf16_vs_eager_fp32"] = _difference(eager, truth)
    return found


def measure_backbone(
    config: TrainJob, device: torch.device, record: Record, nps: int = 10, repeats: int = 3, check_batch: int = 4
) -> None:
    """Every per-backbone figure of `launch/bench.py gpu` for `config`, each recorded as it is measured."""
    objective = build_objective(config, device)
    parameters = sum(p.numel() for p in objective.parameters())
    record("parameters_m", parameters / 1e6)
    # What a DeepSpeed bf16 run holds beside the step's own memory: fp32 master weights and two AdamW moments.
    record("optimizer_state_gb", parameters * 12 / 2**30)
    record("micro_batch", config.train.micro_batch)
    record("nps", nps)
    batch = benchmark_batch(config, nps, device)
    own = config.model.grad_checkpointing
    for checkpointing in (own, not own):
        mode = "on" if checkpointing else "off"
        record(f"checkpointing_{mode}", step_figures(config, objective, batch, device, repeats, checkpointing))
    objective.model.backbone.set_grad_checkpointing(own)
    try:
        record("variants", compare_variants(config, objective, batch, device, repeats))
    except torch.OutOfMemoryError:
        record("variants", {"out_of_memory": True})
    finally:
        _release_memory(objective, device)
    objective.model.backbone.set_grad_checkpointing(False)
    small = benchmark_batch(config, nps, device, batch_size=check_batch)
    # bf16 on a CPU too (autocast supports it there): the dry run checks the same paths a GPU run reports.
    for name, difference in path_differences(objective, small, bf16=True).items():
        record(name, difference)
    del objective
    _release_memory_all(device)


def _release_memory_all(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
