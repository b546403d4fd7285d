"""The contrastive loss over the global batch.

Every query is scored against all targets of the global batch and, as hard negatives, all reference
images (never positives, even when a reference equals its target); its own target is the only positive. A
symmetric target -> query term is averaged in. Embeddings are gathered from every rank with a gather that carries
gradients back to the rank that produced them; the loss module owns this collective.

Scaling across ranks: each rank returns the mean over its own rows. The gather's backward sums the gradient that
every rank's loss sends to a row, and the data-parallel engine averages parameter gradients over ranks, so the
update equals the gradient of the single-process loss over the concatenated global batch (equal micro-batches on
every rank, as the reader guarantees).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from training.engine.distributed import rank_and_world

MAX_LOGIT_SCALE = 100.0
"""Upper clamp of a learned logit scale 1/tau, as CLIP clamps its own (the lower clamp is 1, also as CLIP)."""


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward hands each rank the summed gradient of its own rows.

    Plain synchronous `all_gather` / `all_reduce`: torch's functional (async) collectives corrupted memory under
    gloo on CPU in a long run (a worker aborted with a malloc error inside their backward), and this form is the
    well-trodden one. Summing over ranks matches a reduce-scatter of the gradient.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        rank, world = rank_and_world()
        ctx.rank, ctx.rows = rank, tensor.shape[0]
        chunks = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(chunks, tensor.contiguous())
        return torch.cat(chunks, dim=0)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        summed = grad_output.contiguous().clone()
        dist.all_reduce(summed, op=dist.ReduceOp.SUM)
        return summed[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` (B, ...) from every rank along dim 0; gradients flow back to each rank's own rows.

    Every rank must pass the same batch size (the streaming reader guarantees equal, full batches).
    """
    _, world = rank_and_world()
    if world == 1:
        return tensor
    return _GatherWithGrad.apply(tensor)


class ContrastiveLoss(nn.Module):
    """InfoNCE of queries against gathered targets (+ gathered reference images as negatives), optionally symmetric.

    With `learnable_temperature` the temperature is learned as CLIP learns it: `logit_scale` holds log(1/tau),
    starts at log(1/temperature), and its exponent is clamped to [1, MAX_LOGIT_SCALE] in the forward (a scale at
    the clamp gets no gradient past it). Being a parameter of this module, it is optimized and checkpointed with
    the objective; without the option there is no such parameter at all. It has shape (1,), not CLIP's (): DeepSpeed
    handles 0-d trainable parameters wrongly (its gradient clipping broadcasts a (1,) coefficient into them).
    """

    def __init__(
        self,
        temperature: float = 0.07,
        reference_negatives: bool = True,
        symmetric: bool = True,
        learnable_temperature: bool = False,
    ) -> None:
        super().__init__()
        self.temperature = temperature
        self.reference_negatives = reference_negatives
        self.symmetric = symmetric
        self.logit_scale = (
            nn.Parameter(torch.full((1,), math.log(1.0 / temperature))) if learnable_temperature else None
        )

    def learned_scale(self) -> torch.Tensor:
        """The learned 1/tau, exp(logit_scale) clamped to [1, MAX_LOGIT_SCALE]; only with `learnable_temperature`."""
        return self.logit_scale.float().clamp(0.0, math.log(MAX_LOGIT_SCALE)).exp()

    def _scaled(self, similarities: torch.Tensor) -> torch.Tensor:
        """Similarities divided by the temperature: the fixed one, or the learned one."""
        if self.logit_scale is None:
            return similarities / self.temperature
        return similarities * self.learned_scale()

    def forward(
        self, query: torch.Tensor, target: torch.Tensor, reference: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Loss terms for L2-normalised embeddings (B, D) of this rank.

        Returns:
            `loss` (mean of the directions used), `query_to_target`, `target_to_query` (when symmetric),
            `accuracy` (share of queries whose best candidate is their own target) and, when it is learned, the
            current `temperature`.
        """
        rank, _ = rank_and_world()
        query, target = query.float(), target.float()
        labels = torch.arange(query.shape[0], device=query.device) + rank * query.shape[0]
        candidates = [gather_with_grad(target)]
        if self.reference_negatives and reference is not None:
            candidates.append(gather_with_grad(reference.float()))  # appended after the targets: never a label
        logits = self._scaled(query @ torch.cat(candidates).T)
        terms = {"query_to_target": F.cross_entropy(logits, labels)}
        if self.symmetric:
            logits_back = self._scaled(target @ gather_with_grad(query).T)
            terms["target_to_query"] = F.cross_entropy(logits_back, labels)
        loss = torch.stack(list(terms.values())).mean()
        accuracy = (logits.detach().argmax(dim=1) == labels).float().mean()
        metrics = {"accuracy": accuracy, **{name: value.detach() for name, value in terms.items()}}
        if self.logit_scale is not None:
            metrics["temperature"] = 1.0 / self.learned_scale().detach().reshape(())
        return {"loss": loss, **metrics}
