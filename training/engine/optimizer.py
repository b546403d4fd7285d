"""AdamW with decoupled weight decay on weight matrices only (the schedule is `training.engine.schedule`).

The optimizer can be told to skip a step (`SkippableAdamW.skipping`): the training loop uses this
when a step's loss or gradients are non-finite on any rank, so that the parameters and the Adam moments stay
exactly as they were. It reports the skip through `overflow`, the attribute DeepSpeed reads after a step to
count a skipped step and hold the learning-rate schedule back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from training.engine.config import OptimConfig

_NO_DECAY_MODULES = (nn.LayerNorm, nn.GroupNorm, nn.Embedding, nn.modules.batchnorm._BatchNorm)
# Parameter names that are embeddings or learned seeds even when they are plain 2-D `nn.Parameter`s
# (open_clip's `positional_embedding`, `class_embedding`, the fusion pooler's seed/query tokens).
_NO_DECAY_NAME_PARTS = ("embedding", "embed", "seed", "pos_")


def decays(name: str, parameter: nn.Parameter, owner: nn.Module) -> bool:
    """Whether weight decay applies: weight matrices yes; norms, biases, embeddings and learned seeds no.

    Args:
        name: the parameter's own name inside `owner` (e.g. `weight`, `bias`, `positional_embedding`).
        parameter: the parameter.
        owner: the module that holds it directly.
    """
    if parameter.ndim < 2 or isinstance(owner, _NO_DECAY_MODULES):
        return False  # biases, norm gains, scalars such as a logit scale
    if "norm" in type(owner).__name__.lower():
        return False  # RMSNorm and other norm layers outside torch.nn
    return not any(part in name.lower() for part in _NO_DECAY_NAME_PARTS)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW parameter groups, `decay` and `no_decay`, over the trainable parameters of `model`."""
    decay, no_decay = [], []
    seen: set[int] = set()
    for module in model.modules():
        for name, parameter in module.named_parameters(recurse=False):
            if not parameter.requires_grad or id(parameter) in seen:
                continue
            seen.add(id(parameter))
            (decay if decays(name, parameter, module) else no_decay).append(parameter)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
    return [group for group in groups if group["params"]]


class SkippableAdamW(torch.optim.AdamW):
    """`torch.optim.AdamW` whose next `step()` can be turned into a no-op that leaves parameters and state alone."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.overflow = False
        self._skip_next = False

    @contextlib.contextmanager
    def skipping(self, skip: bool = True) -> Iterator[None]:
        """Inside the block, a `step()` changes nothing and `overflow` reads True after it.

        The flag is cleared on exit even when no step ran (DeepSpeed's ZeRO optimizers return early on
        non-finite gradients without calling us), so it can never leak into the next step.
        """
        self._skip_next = skip
        try:
            yield
        finally:
            self._skip_next = False

    @torch.no_grad()
    def step(self, closure=None):
        if self._skip_next:
            self._skip_next = False
            self.overflow = True
            return None
        self.overflow = False
        return super().step(closure)


def build_optimizer(model: nn.Module, config: OptimConfig) -> SkippableAdamW:
    """AdamW over `model` with the configured betas, eps and weight decay (none on norms/biases/embeddings/seeds)."""
    return SkippableAdamW(
        param_groups(model, config.weight_decay),
        lr=config.lr,
        betas=(config.beta1, config.beta2),
        eps=config.eps,
        weight_decay=config.weight_decay,
    )
