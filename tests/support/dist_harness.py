"""Run a function on N spawned CPU ranks joined by a gloo process group on 127.0.0.1 (collectives tier of tests).

    results = run_ranks(my_check, world_size=2, args=(tmp_path,))   # my_check(rank, world_size, *args) -> JSON

Each rank's return value comes back through a JSON file, so results must be JSON-serialisable. An exception on
any rank fails the call with that rank's traceback.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def listening_hosts(pid: int, port: int | None = None) -> list[str]:
    """The local addresses process `pid` listens on (only those on `port` when given), from `ss -ltnp`."""
    output = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    hosts = []
    for line in output.splitlines():
        host, _, listening_port = line.split()[3].rpartition(":")
        if f"pid={pid}," in line and (port is None or int(listening_port) == port):
            hosts.append(host.split("%")[0])
    return hosts


def is_loopback(host: str) -> bool:
    return host.startswith("127.") or host == "[::1]" or host.startswith("[::ffff:127.")


def _rank_main(rank: int, world_size: int, port: int, fn: Callable, args: tuple, out_dir: str) -> None:
    import sys

    sys.path.insert(0, str(REPO_ROOT))
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        GLOO_SOCKET_IFNAME="lo",
        OMP_NUM_THREADS="1",
    )
    import torch
    import torch.distributed as dist

    from cluster.runtime.rendezvous import bind_store_to_master_addr

    bind_store_to_master_addr()  # as Ray Train workers do: rank 0's store on 127.0.0.1 only
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def run_ranks(fn: Callable, world_size: int, args: tuple = ()) -> list[Any]:
    """Call `fn(rank, world_size, *args)` on `world_size` spawned ranks; their return values in rank order."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_rank_main, args=(world_size, free_port(), fn, args, out_dir), nprocs=world_size, join=True)
        return [json.loads(Path(out_dir, f"rank{rank}.json").read_text()) for rank in range(world_size)]
