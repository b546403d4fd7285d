"""The Ray Train `TorchTrainer` that runs `training.trainer.worker.train_worker` on `cluster.num_workers` ranks.

Ray sets up torch.distributed (gloo on CPU, NCCL on GPU) before calling the worker, with rank 0's rendezvous store
listening on MASTER_ADDR only (`StoreOnMasterAddr`). On a worker failure Ray
restarts the whole group up to `cluster.max_failures` times; each restarted worker resumes from the run's latest
complete checkpoint on the shared storage, so Ray itself never holds training state (nothing is reported to it).
An error that a restart would meet again ends the job at once (`cluster/runtime/failure_policy.py`). The driver owns the run
while it trains (`training.checkpoint.owner_lease`): workers whose driver is gone publish no checkpoint.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from ray.train import FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
from ray.train.torch import TorchConfig, TorchTrainer
from ray.train.torch.config import _TorchBackend

from cluster.root_config import RootConfig
from cluster.runtime.failure_policy import PermanentFirstTorchTrainer, log_permanent_errors_in_one_line, permanent_error
from cluster.runtime.progress import MetricsProgress
from cluster.runtime.rendezvous import bind_store_to_master_addr
from cluster.runtime.resources import record_placement, resource_wait, worker_resources
from shards.storage import is_url
from training.checkpoint import owner_lease

logger = logging.getLogger(__name__)


class _StoreOnMasterAddrBackend(_TorchBackend):
    """Ray's torch backend, each worker first told to serve rank 0's store on MASTER_ADDR only."""

    def on_start(self, worker_group, backend_config) -> None:
        worker_group.execute(bind_store_to_master_addr)
        super().on_start(worker_group, backend_config)


class StoreOnMasterAddr(TorchConfig):
    """`TorchConfig` whose process-group setup binds rank 0's rendezvous store to MASTER_ADDR (cluster/runtime/rendezvous.py).

    Ray's own setup leaves it listening on every interface. MASTER_ADDR is the address Ray picked for rank 0's node:
    127.0.0.1 on a local run, the node's cluster address otherwise.
    """

    @property
    def backend_cls(self):
        return _StoreOnMasterAddrBackend


# Forwarded from the driver's environment to every worker when set.
FORWARDED_ENV = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "NCCL_DEBUG", "OMP_NUM_THREADS")


WORKER_LOGS = "logs"
"""`<run>/logs/worker_<rank>.log`: each rank's stdout and stderr (DeepSpeed's, torch's and our own lines)."""


def send_output_to_run_logs(run_dir: str | Path, rank: int) -> Path:
    """Point this process's stdout and stderr at `<run_dir>/logs/worker_<rank>.log`, appended across attempts.

    The file descriptors themselves are replaced, so output written below Python (DeepSpeed's op builder, torch's
    C++ warnings) lands there too. The driver's console then holds only what a user acts on: its progress bar and
    results; what each rank said is in the run directory beside its checkpoints.
    """
    path = Path(run_dir) / WORKER_LOGS / f"worker_{rank}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(descriptor, 1)
        os.dup2(descriptor, 2)
    finally:
        os.close(descriptor)
    return path


def _train_loop_per_worker(loop_config: dict) -> None:
    import ray.train

    from training.trainer.worker import train_worker

    world_rank = ray.train.get_context().get_world_rank()
    send_output_to_run_logs(loop_config["config"].run_dir, world_rank)
    log_permanent_errors_in_one_line()
    local_rank = ray.train.get_context().get_local_rank()
    record_placement(loop_config["config"].run_dir, world_rank)
    config, console, owner = loop_config["config"], loop_config.get("console", True), loop_config["owner"]
    train_worker(config, local_rank=local_rank, console=console, owner=owner)


def resolve_storage(config: RootConfig) -> RootConfig:
    """The same config with every path the workers read made absolute: workers do not share the driver's cwd.

    Covers `cluster.storage_path`, `data.shards_dir` (unless a URL), `model.weights_file`, `model.init_from` and
    `model.cache_dir`; relative paths resolve against the driver's working directory.
    """

    def absolute(path: str | None) -> str | None:
        if not path or is_url(path):  # an object-store URL means the same on every node
            return path
        return str(Path(path).expanduser().resolve())

    config.cluster.storage_path = absolute(config.cluster.storage_path)
    config.data.shards_dir = absolute(config.data.shards_dir)
    config.model.weights_file = absolute(config.model.weights_file)
    config.model.init_from = absolute(config.model.init_from)
    config.model.cache_dir = absolute(config.model.cache_dir)
    return config


def build_trainer(config: RootConfig, console: bool = True, owner: str | None = None) -> TorchTrainer:
    """The TorchTrainer for `config` (its storage path must already be absolute: see `resolve_storage`).

    `console=False`: rank 0 prints no step lines (the driver shows a progress bar instead). `owner`: the token of
    the driver's lease on the run (`training.checkpoint.owner_lease.held`)."""
    cluster = config.cluster
    if not Path(cluster.storage_path).is_absolute():
        raise ValueError(f"cluster.storage_path={cluster.storage_path!r} must be absolute here")
    env_vars = {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}
    return PermanentFirstTorchTrainer(
        _train_loop_per_worker,
        train_loop_config={"config": config, "console": console, "owner": owner},
        scaling_config=ScalingConfig(
            num_workers=cluster.num_workers,
            use_gpu=cluster.use_gpu,
            resources_per_worker=worker_resources(cluster),
            placement_strategy=cluster.placement_strategy,
        ),
        run_config=RunConfig(
            name=cluster.run_name,
            storage_path=cluster.storage_path,
            # A group that cannot start within cluster.resource_wait_s ends the job (cluster/runtime/resources.py).
            failure_config=FailureConfig(max_failures=cluster.max_failures, controller_failure_limit=0),
            worker_runtime_env={"env_vars": env_vars},
        ),
        torch_config=StoreOnMasterAddr(backend="nccl" if cluster.use_gpu else "gloo"),
    )


def run_training(config: RootConfig) -> Path:
    """Run the training job to the end (Ray must be connected). Returns the run directory.

    Raises:
        training.errors.PermanentError: a worker failed in a way a restart would repeat (not retried).
        ray.train.TrainingFailedError: the worker group failed more than `cluster.max_failures` times.
        cluster.runtime.resources.ResourceWaitExpired: the workers' resources did not appear within `cluster.resource_wait_s`.
    """
    config = resolve_storage(config)
    with owner_lease.held(config.run_dir) as owner:
        trainer = build_trainer(config, console=False, owner=owner)
        try:
            with (
                MetricsProgress(config.run_dir, config.train.steps, config.train.global_batch),
                resource_wait(config.cluster),
            ):
                trainer.fit()
        except TrainingFailedError as failure:
            permanent = permanent_error(failure)
            if permanent is None:
                raise
            raise permanent from None  # the worker's own one-line message; Ray's wrapper adds only a traceback
    return config.run_dir
