"""The DeepSpeed engine: its JSON config from the job config, and `deepspeed.initialize` with our optimizer and schedule.

Precision, ZeRO, accumulation and clipping live here and in the config, never as branches in the loop.
bf16 is DeepSpeed's `torch_autocast` mode: fp32 master weights, bf16 matmuls inside the forward, fp32 gradients
into AdamW (as open_clip's `amp_bf16`). Gradients are all-reduced in `deepspeed.reduce_dtype` (fp32 by default):
DeepSpeed's autocast mode would otherwise tag every Linear and Conv weight to be reduced in bf16 under ZeRO. That keeps one optimizer path for every stage and precision, which is
what lets the loop skip a non-finite step without touching the Adam moments: at stage 0 our `SkippableAdamW`
obeys the loop's collective vote; under ZeRO the DeepSpeed optimizer also refuses non-finite gradients itself
(from the global norm) before calling AdamW. Either way DeepSpeed counts the skip and holds the LR schedule back,
and its micro-step counters stay aligned because `engine.step()` still runs.

DeepSpeed's own checkpoint loader unpickles arbitrary objects (its `torch.load` turns `weights_only` off). `SafeTorchCheckpointEngine` replaces
it with `weights_only=True` plus an allow-list of the few plain DeepSpeed types its ZeRO optimizer states hold,
so resuming never unpickles arbitrary objects.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from training.engine.config import BatchGeometry, DeepSpeedConfig, OptimConfig
from training.engine.optimizer import SkippableAdamW, build_optimizer
from training.engine.schedule import build_scheduler

logger = logging.getLogger(__name__)

_NEVER_PRINT = 2**62  # DeepSpeed's own periodic progress print; our monitor logs instead


def uses_bf16(section: DeepSpeedConfig, use_gpu: bool) -> bool:
    """bf16 autocast: `deepspeed.precision` bf16, or `auto` with GPUs."""
    return section.precision == "bf16" or (section.precision == "auto" and use_gpu)


def deepspeed_config(section: DeepSpeedConfig, batch: BatchGeometry, use_gpu: bool) -> dict[str, Any]:
    """DeepSpeed's JSON config: the `deepspeed` section, the batch split over the ranks, bf16 on GPU."""
    zero: dict[str, Any] = {"stage": section.zero_stage}
    if section.zero_stage >= 1:
        zero |= {
            "overlap_comm": section.overlap_comm,
            "reduce_bucket_size": section.reduce_bucket_size,
            "allgather_bucket_size": section.allgather_bucket_size,
        }
    if section.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
    result: dict[str, Any] = {
        "train_batch_size": batch.global_batch,
        "train_micro_batch_size_per_gpu": batch.micro_batch,
        "gradient_accumulation_steps": batch.accumulation_steps,
        "gradient_clipping": section.gradient_clipping,
        "zero_optimization": zero,
        # Our AdamW subclass is a plain torch AdamW to ZeRO; with offload we keep it instead of DeepSpeedCPUAdam.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": _NEVER_PRINT,
        "wall_clock_breakdown": False,
        "communication_data_type": section.reduce_dtype,
    }
    if uses_bf16(section, use_gpu):
        result["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
        if section.reduce_dtype == "fp32":
            # No module's weights are tagged for a bf16 reduction; `communication_data_type` then applies to all.
            result["torch_autocast"]["lower_precision_safe_modules"] = []
    return result


def _deepspeed_safe_globals() -> list[type]:
    """The DeepSpeed classes found in its ZeRO optimizer checkpoints: enums, a dataclass and the loss scalers."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def safe_checkpoint_engine(config_params):
    """A `TorchCheckpointEngine` whose `load` uses `torch.load(weights_only=True)` and the allow-list above."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(_deepspeed_safe_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)

    return SafeTorchCheckpointEngine(config_params)


@contextlib.contextmanager
def _scalars_as_vectors(module: nn.Module) -> Iterator[None]:
    """Show 0-d parameters (open_clip's `logit_scale`) as shape (1,) while DeepSpeed initialises.

    DeepSpeed 0.19 broadcasts every parameter from rank 0 as `p.data.view(torch.uint8)`, which fails on 0-d
    tensors. The reshape is a view, so storage (and any flat buffer DeepSpeed builds over it) stays shared.
    """
    scalars = [parameter for parameter in module.parameters() if parameter.ndim == 0]
    for parameter in scalars:
        parameter.data = parameter.data.reshape(1)
    try:
        yield
    finally:
        for parameter in scalars:
            if hasattr(parameter, "ds_shape"):  # ZeRO-3 partitioned it: fix the shape its gathers restore
                parameter.ds_shape = torch.Size([])
            else:
                parameter.data = parameter.data.reshape(())


def use_venv_extensions_dir() -> None:
    """Build DeepSpeed's ops into this interpreter's virtualenv (`<venv>/torch_extensions`) unless
    `TORCH_EXTENSIONS_DIR` is set: jobs of two checkouts never share, or race on, one half-built op, and `make
    install` has built them there already. Outside a virtualenv torch's own default stays."""
    if "TORCH_EXTENSIONS_DIR" not in os.environ and sys.prefix != sys.base_prefix:
        os.environ["TORCH_EXTENSIONS_DIR"] = str(Path(sys.prefix) / "torch_extensions")


def build_engine(module: nn.Module, optim: OptimConfig, deepspeed_json: dict[str, Any]):
    """Wrap `module` (the objective) in a DeepSpeed engine (`deepspeed_config`) with our AdamW and schedule.

    torch.distributed must already be initialised (Ray's TorchConfig, or the test harness): DeepSpeed reuses
    that process group.

    Returns:
        (engine, optimizer, scheduler): the optimizer is the `SkippableAdamW` DeepSpeed steps.
    """
    use_venv_extensions_dir()
    import deepspeed

    os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed insists on it; Ray and torchrun set the real value
    optimizer = build_optimizer(module, optim)
    scheduler = build_scheduler(optimizer, optim)
    with _scalars_as_vectors(module):
        engine, _, _, _ = deepspeed.initialize(
            model=module,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=deepspeed_json,
            dist_init_required=False,
        )
    engine.checkpoint_engine = safe_checkpoint_engine(engine._config)
    assert isinstance(engine.basic_optimizer, SkippableAdamW)
    return engine, optimizer, scheduler


def local_grad_norm(module: nn.Module) -> torch.Tensor:
    """2-norm of the gradients held in `param.grad` (after DeepSpeed's reduction at the accumulation boundary).

    Under ZeRO the gradients live in partitioned buffers instead; then this is 0 and DeepSpeed's own global norm
    (and its own non-finite check) applies.
    """
    grads = [parameter.grad.detach() for parameter in module.parameters() if parameter.grad is not None]
    if not grads:
        return torch.zeros((), dtype=torch.float32)
    return torch.nn.utils.get_total_norm(grads).float()
