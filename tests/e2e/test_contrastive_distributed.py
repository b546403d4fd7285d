"""The gathered contrastive loss on 2 gloo ranks equals the single-process loss over the concatenated batch.

Convention (training/losses.py): each rank returns the mean over its own rows; the data-parallel engine averages
parameter gradients over ranks. Averaged that way, the ranks' losses and gradients equal the single-process ones.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from training.objectives.contrastive import ContrastiveLoss

WORLD, PER_RANK, IN, DIM = 2, 3, 6, 4


def _data():
    generator = torch.Generator().manual_seed(7)
    return [torch.randn(WORLD * PER_RANK, IN, generator=generator) for _ in range(3)]


def _encoder() -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(IN, DIM)


def _loss(encoder, queries, targets, references) -> torch.Tensor:
    embed = lambda rows: F.normalize(encoder(rows), dim=-1)  # noqa: E731
    return ContrastiveLoss(0.07)(embed(queries), embed(targets), embed(references))["loss"]


def _rank(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        encoder = _encoder()
        rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        loss = _loss(encoder, *(part[rows] for part in _data()))
        loss.backward()
        # What the data-parallel engine does with gradients: average them over ranks.
        for parameter in encoder.parameters():
            dist.all_reduce(parameter.grad)
            parameter.grad /= WORLD
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        mean_loss /= WORLD
        torch.save(
            {"loss": mean_loss, "local_loss": loss.detach(), "weight": encoder.weight.grad, "bias": encoder.bias.grad},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_gloo_ranks_equal_the_single_process_loss_and_gradients(tmp_path):
    mp.spawn(_rank, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)

    encoder = _encoder()
    single = _loss(encoder, *_data())
    single.backward()

    results = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD)]
    for result in results:
        torch.testing.assert_close(result["loss"], single.detach(), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(result["weight"], encoder.weight.grad, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(result["bias"], encoder.bias.grad, atol=1e-6, rtol=1e-5)
    # The ranks saw different rows, so their own losses differ: the negatives really came from the other rank.
    assert not torch.allclose(results[0]["local_loss"], results[1]["local_loss"])
