"""Every listener of a local training job stays on 127.0.0.1, the rendezvous store of rank 0 included."""

from __future__ import annotations

import os
import shutil
from datetime import timedelta

import pytest
from dist_harness import free_port, is_loopback, listening_hosts, run_ranks
from torch.distributed import TCPStore

from cluster.runtime.rendezvous import create_store

pytestmark = pytest.mark.skipif(shutil.which("ss") is None, reason="`ss` (iproute2) is not installed")


def test_rank0_store_listens_on_its_host_only_where_torchs_own_listens_everywhere():
    port = free_port()
    store = create_store("127.0.0.1", port, rank=0, world_size=1, timeout=timedelta(seconds=30))
    store.set("key", "value")
    assert store.get("key") == b"value"
    assert listening_hosts(os.getpid(), port) == ["127.0.0.1"]
    # What torch does with the same arguments, and what a Ray Train worker did before the hook: every interface.
    exposed_port = free_port()
    exposed = TCPStore("127.0.0.1", exposed_port, 1, True, timedelta(seconds=30), multi_tenant=True)
    assert set(listening_hosts(os.getpid(), exposed_port)) - {"127.0.0.1"}, "torch's store now binds its host"
    del store, exposed


def test_a_taken_port_is_a_clear_error():
    port = free_port()
    first = create_store("127.0.0.1", port, rank=0, world_size=1, timeout=timedelta(seconds=30))
    with pytest.raises(RuntimeError, match=rf"cannot listen on 127.0.0.1:{port}"):
        create_store("127.0.0.1", port, rank=0, world_size=1, timeout=timedelta(seconds=30))
    del first


def _own_listeners(rank: int, world_size: int) -> list[str]:
    import torch
    import torch.distributed as dist

    dist.all_reduce(torch.ones(1))  # the gloo pairs are connected by now
    return listening_hosts(os.getpid())


def test_ranks_joined_by_env_rendezvous_listen_on_loopback_only():
    """The harness joins ranks as Ray Train does (`env://`, MASTER_ADDR=127.0.0.1), with the worker hook."""
    listeners = run_ranks(_own_listeners, world_size=2)
    assert listeners[0], "rank 0 serves the store"
    assert all(is_loopback(host) for hosts in listeners for host in hosts), listeners


def test_ray_train_sets_up_its_process_group_through_the_binding_backend(tmp_path):
    """The live check (every listener of a 2-worker Ray job on 127.0.0.1) is in tests/e2e/test_train_e2e.py."""
    from cluster.jobs.trainer import StoreOnMasterAddr, build_trainer
    from cluster.root_config import load_config

    config = load_config("configs/tiny.yaml", [f"cluster.storage_path={tmp_path}"])
    backend_config = build_trainer(config).backend_config
    assert isinstance(backend_config, StoreOnMasterAddr) and backend_config.backend == "gloo"
    assert backend_config.backend_cls.on_start.__qualname__.startswith("_StoreOnMasterAddrBackend")
