"""AdamW parameter groups, the skippable step and the warmup + cosine-warm-restart schedule (no processes)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from training.engine.config import OptimConfig
from training.engine.optimizer import build_optimizer, param_groups
from training.engine.schedule import WarmupCosineRestarts, build_scheduler


class _Tower(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(10, 4)
        self.positional_embedding = nn.Parameter(torch.zeros(5, 4))
        self.class_embedding = nn.Parameter(torch.zeros(4))
        self.pool_seed = nn.Parameter(torch.zeros(1, 4))
        self.proj = nn.Parameter(torch.zeros(4, 4))
        self.linear = nn.Linear(4, 4)
        self.ln = nn.LayerNorm(4)
        self.logit_scale = nn.Parameter(torch.ones(()))
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def test_no_decay_on_norms_biases_embeddings_and_seeds():
    model = _Tower()
    groups = {group["name"]: group for group in param_groups(model, 0.01)}
    assert list(groups) == ["decay", "no_decay"]  # one multiplier: the two groups runs before lr groups resume with
    decayed = {id(p) for p in groups["decay"]["params"]}
    assert decayed == {id(model.proj), id(model.linear.weight)}
    assert groups["decay"]["weight_decay"] == 0.01 and groups["no_decay"]["weight_decay"] == 0.0
    everything = decayed | {id(p) for p in groups["no_decay"]["params"]}
    assert everything == {id(p) for p in model.parameters() if p.requires_grad}  # frozen ones left out


def test_schedule_warmup_then_cosine_restarts():
    config = OptimConfig(lr=1e-3, min_lr=1e-5, warmup_steps=4, restart_every=10)
    multiplier = WarmupCosineRestarts(config.warmup_steps, config.restart_every, config.min_lr / config.lr)
    assert [multiplier(step) for step in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert multiplier(4) == pytest.approx(1.0)  # cycle start: peak
    assert multiplier(9) == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 5 / 10)))
    assert multiplier(12) > multiplier(13) > 0.01  # falling towards the floor
    assert multiplier(14) == pytest.approx(1.0)  # warm restart
    assert min(multiplier(step) for step in range(4, 60)) >= 0.01 - 1e-12


def test_scheduler_state_resumes_the_same_lrs():
    config = OptimConfig(lr=1e-3, min_lr=1e-5, warmup_steps=3, restart_every=5)
    model = nn.Linear(3, 3)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config)
    lrs = []
    for _ in range(12):
        optimizer.step()
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.98) and optimizer.param_groups[0]["eps"] == 1e-8

    fresh_model = nn.Linear(3, 3)
    fresh_optimizer = build_optimizer(fresh_model, config)
    fresh_scheduler = build_scheduler(fresh_optimizer, config)
    for _ in range(6):
        fresh_optimizer.step()
        fresh_scheduler.step()
    state = fresh_scheduler.state_dict()
    resumed_optimizer = build_optimizer(nn.Linear(3, 3), config)
    resumed = build_scheduler(resumed_optimizer, config)
    resumed.load_state_dict(state)
    tail = []
    for _ in range(6):
        resumed_optimizer.step()
        resumed.step()
        tail.append(resumed_optimizer.param_groups[0]["lr"])
    assert tail == lrs[6:]


def test_skipped_step_changes_neither_parameters_nor_moments():
    model = nn.Linear(3, 2)
    optimizer = build_optimizer(model, OptimConfig(lr=0.1, min_lr=0.0, warmup_steps=0))
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    assert not optimizer.overflow
    before_params = [p.detach().clone() for p in model.parameters()]
    before_state = {k: v.clone() for p in model.parameters() for k, v in optimizer.state[p].items()}
    model(torch.randn(4, 3)).sum().backward()
    with optimizer.skipping():
        optimizer.step()
    assert optimizer.overflow
    assert all(torch.equal(a, b) for a, b in zip(before_params, model.parameters()))
    after_state = {k: v for p in model.parameters() for k, v in optimizer.state[p].items()}
    assert all(torch.equal(before_state[k], after_state[k]) for k in before_state)
    with optimizer.skipping():
        pass  # a skip that no step consumed (DeepSpeed refused the step itself) must not leak
    optimizer.step()
    assert not optimizer.overflow
    assert not all(torch.equal(a, b) for a, b in zip(before_params, model.parameters()))
