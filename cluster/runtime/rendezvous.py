"""Rank 0's torch.distributed store listens on MASTER_ADDR only, never on every interface.

Ray Train joins its workers with `init_method="env://"`. For that URL torch starts rank 0's key-value store (the
TCPStore every rank rendezvous through) bound to all interfaces (`*:<port>`, IPv4 and IPv6), whatever MASTER_ADDR
says: on a local run the store of a job bound to 127.0.0.1 was reachable from the network. `bind_store_to_master_addr`
runs in each Ray Train worker process before Ray sets up the process group (a Ray worker setup hook, see
`cluster.jobs.trainer`). From then on rank 0 binds the store's socket itself, to MASTER_ADDR:MASTER_PORT (127.0.0.1 on a
local run, the node address Ray chose on a cluster), and hands it to the store (`master_listen_fd`). The other ranks
connect as before.
"""

from __future__ import annotations

import importlib
import socket
from datetime import timedelta

from torch.distributed import TCPStore

# The module, not the function of the same name that torch.distributed exports.
torch_rendezvous = importlib.import_module("torch.distributed.rendezvous")

_BACKLOG = 2048


def _listening_socket(host: str, port: int) -> socket.socket:
    """A socket listening on exactly `host:port` (IPv4 or IPv6 as `host` resolves)."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    listener = socket.socket(family, kind, proto)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
        listener.listen(_BACKLOG)
    except OSError as error:
        listener.close()
        raise RuntimeError(f"torch.distributed store: cannot listen on {host}:{port} ({error})") from error
    return listener


def create_store(
    hostname: str, port: int, rank: int, world_size: int, timeout: timedelta, use_libuv: bool = True
) -> TCPStore:
    """The store of one rank for `env://` / `tcp://`: rank 0 serves it on `hostname:port` only, the others connect."""
    if not 0 <= port < 2**16:
        raise ValueError(f"port must have value from 0 to 65535 but was {port}.")
    agent_serves = getattr(torch_rendezvous, "_agent_store_serves", None)  # torchrun's agent hosts it already
    if rank != 0 or (agent_serves is not None and agent_serves(hostname, port)):
        return TCPStore(hostname, port, world_size, False, timeout, multi_tenant=True, use_libuv=use_libuv)
    listener = _listening_socket(hostname, port)
    # The store owns the descriptor from here on (it closes it when it shuts down).
    return TCPStore(
        hostname,
        port,
        world_size,
        True,
        timeout,
        multi_tenant=True,
        master_listen_fd=listener.detach(),
        use_libuv=use_libuv,
    )


def bind_store_to_master_addr() -> None:
    """Make this process's `env://` and `tcp://` rendezvous serve rank 0's store on MASTER_ADDR only.

    torch's handlers for both URLs create their store through `torch.distributed.rendezvous._create_c10d_store`;
    this replaces it in this process. A torch release that renamed it would fail here, loudly, rather than leave
    the store exposed (tests/unit/test_rendezvous.py checks the listening address).
    """
    if not hasattr(torch_rendezvous, "_create_c10d_store"):
        raise RuntimeError("torch.distributed.rendezvous._create_c10d_store is gone: cannot bind the store")
    torch_rendezvous._create_c10d_store = create_store
