"""AdamW with decoupled weight decay on weight matrices only (the schedule is `training.engine.schedule`).

Parameters fall into module groups, each with its own learning-rate multiplier: a module that declares an
`lr_group` attribute (the CLIP towers declare `tower`) puts its parameters in that group, and all others are in
`head`. Each group is split again into decay and no-decay parameters.

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
HEAD_GROUP = "head"
"""The module group of every parameter whose modules declare no `lr_group`."""
TOWER_GROUP = "tower"
"""The module group the CLIP towers declare (`optim.tower_lr_mult`)."""


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


def _module_groups(model: nn.Module) -> dict[int, str]:
    """id(parameter) -> the `lr_group` of its innermost module that declares one, for the parameters that have one."""
    groups: dict[int, str] = {}
    for module in model.modules():  # pre-order: an inner module's declaration overrides an outer one's
        group = getattr(module, "lr_group", None)
        if group is not None:
            groups.update((id(parameter), group) for parameter in module.parameters())
    return groups


def param_groups(model: nn.Module, weight_decay: float, lr: float | None = None, lr_mults=None) -> list[dict]:
    """AdamW parameter groups `<module group>/decay` and `<module group>/no_decay` over the trainable parameters.

    Args:
        model: the module to optimize; frozen parameters (requires_grad False) are left out.
        weight_decay: decay of the `decay` groups (the `no_decay` groups get none).
        lr: the base learning rate; when given, each group's `lr` is it times its module group's multiplier.
        lr_mults: module group -> lr multiplier (default 1), e.g. {"tower": 0.1, "head": 1.0}.

    Returns:
        The non-empty groups, `head` groups first, each with `params`, `weight_decay`, `name`, `lr_mult` and
        (with `lr`) `lr`. When every module group has the same multiplier there are just `decay` and `no_decay`.
    """
    lr_mults = dict(lr_mults or {})
    module_groups = _module_groups(model)
    if len({float(lr_mults.get(name, 1.0)) for name in {HEAD_GROUP, *module_groups.values()}}) == 1:
        # One multiplier for everything: the two groups `decay` and `no_decay` of runs started before module groups
        # existed, so their optimizer state still resumes.
        module_groups = {}
    buckets: dict[tuple[str, bool], list[nn.Parameter]] = {}
    seen: set[int] = set()
    for module in model.modules():
        for name, parameter in module.named_parameters(recurse=False):
            if not parameter.requires_grad or id(parameter) in seen:
                continue
            seen.add(id(parameter))
            key = (module_groups.get(id(parameter), HEAD_GROUP), decays(name, parameter, module))
            buckets.setdefault(key, []).append(parameter)
    groups = []
    for group_name, decay in sorted(buckets, key=lambda key: (key[0] != HEAD_GROUP, key[0], not key[1])):
        mult = float(lr_mults.get(group_name, 1.0))
        kind = "decay" if decay else "no_decay"
        group = {
            "params": buckets[group_name, decay],
            "weight_decay": weight_decay if decay else 0.0,
            "name": f"{group_name}/{kind}" if module_groups else kind,
            "lr_mult": mult,
        }
        if lr is not None:
            group["lr"] = lr * mult
        groups.append(group)
    return groups


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
    """AdamW over the trainable parameters of `model` with the configured betas, eps and weight decay (none on
    norms/biases/embeddings/seeds), the towers' groups at `lr * tower_lr_mult` and the rest at `lr * head_lr_mult`.
    """
    lr_mults = {TOWER_GROUP: config.tower_lr_mult, HEAD_GROUP: config.head_lr_mult}
    return SkippableAdamW(
        param_groups(model, config.weight_decay, config.lr, lr_mults),
        lr=config.lr,
        betas=(config.beta1, config.beta2),
        eps=config.eps,
        weight_decay=config.weight_decay,
    )
