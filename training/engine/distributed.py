"""The few collectives the loop and the checkpointer need, on top of an initialised torch.distributed group.

Gathers carry JSON text or raw bytes as uint8 tensors, never pickled objects, so nothing a rank sends is
ever unpickled by another.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _device() -> torch.device:
    """Where collective tensors must live: the current GPU under NCCL, else CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over ranks of a float tensor (returned on CPU)."""
    values = values.detach().to(_device(), torch.float64)
    if dist.is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values.cpu()


def all_gather_bytes(payload: bytes) -> list[bytes]:
    """Every rank's `payload`, in rank order (lengths may differ)."""
    if not dist.is_initialized():
        return [payload]
    device, world = _device(), dist.get_world_size()
    length = torch.tensor([len(payload)], dtype=torch.int64, device=device)
    lengths = [torch.zeros_like(length) for _ in range(world)]
    dist.all_gather(lengths, length)
    longest = int(max(int(item) for item in lengths))
    buffer = torch.zeros(longest, dtype=torch.uint8, device=device)
    if payload:
        buffer[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(device)
    buffers = [torch.zeros_like(buffer) for _ in range(world)]
    dist.all_gather(buffers, buffer)
    return [bytes(item[: int(size)].cpu().numpy().tobytes()) for item, size in zip(buffers, lengths)]


def all_gather_json(value: Any) -> list[Any]:
    """Every rank's JSON-serialisable `value`, in rank order."""
    return [json.loads(item) for item in all_gather_bytes(json.dumps(value).encode())]


def chain_digests(previous: str, local: bytes) -> str:
    """`previous` extended by every rank's `local` digest, in rank order (one collective: call it rarely)."""
    combined = hashlib.sha256(previous.encode())
    for digest in all_gather_bytes(local):
        combined.update(digest)
    return combined.hexdigest()[:16]
