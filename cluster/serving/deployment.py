"""The search server as a Ray Serve application: replicas of `SearchReplica` behind one HTTP proxy.

Each replica loads the bundle and the index once and batches concurrent queries through `serve.batch`. `run_server`
checks the bundle, the index and the port before Ray starts, then deploys. Nothing here imports `ray` at module
level: the driver must call `cluster.runtime.ray_setup.connect` first.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from cluster.serving.config import ServeConfig
from cluster.serving.http_api import Query, SearchService, create_app

if TYPE_CHECKING:
    import numpy as np
    from fastapi import FastAPI

    from cluster.runtime.config import ClusterConfig

logger = logging.getLogger(__name__)

APP_NAME = "context_cir"


class ServeError(RuntimeError):
    """The server cannot start as asked (bundle, index, mismatch, port); the message says why."""


# --- checks before anything starts --------------------------------------------------------------------------------


def check_inputs(bundle: str | Path | None, index: str | Path) -> tuple[Path, str]:
    """Check that the index and its bundle load and belong together, before Ray starts.

    Args:
        bundle: the bundle directory, or None for the one the index records.

    Returns:
        The bundle directory, and a one-line description for the console.

    Raises:
        ServeError: a damaged bundle or index, no bundle known, or an index built from another bundle.
    """
    from training.retrieval.bundle import BundleError, verify_bundle
    from training.retrieval.gallery_index import GalleryIndex, GalleryIndexError

    try:
        gallery = GalleryIndex.open(index)
        bundle = bundle or gallery.bundle_dir
        if bundle is None:
            raise GalleryIndexError(f"{index} does not record its bundle: pass --bundle")
        info = verify_bundle(bundle)
        gallery.check_bundle(info.weights_sha256)
    except (BundleError, GalleryIndexError, OSError) as error:
        raise ServeError(str(error)) from error
    return Path(bundle), f"bundle {info.weights_sha256[:12]} ({info.backbone}), gallery of {len(gallery)} images"


def check_port_free(host: str, port: int) -> None:
    """Raise ServeError when `host:port` cannot be bound here (Serve's proxy would retry forever)."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as error:
        raise ServeError(
            f"cannot listen on {host}:{port}: {error.strerror or error} (serve.host, serve.port)"
        ) from error


class SearchReplica:
    """One Serve replica: loads the model and the index once, then answers through `create_app`'s routes.

    Made a Serve ingress deployment by `build_application` (`serve.ingress()` calls `__serve_build_asgi_app__`
    after the constructor), so that this module imports no `ray` until a driver asks for it.
    """

    def __init__(self, bundle: str, index: str, config: ServeConfig, device: str, base_dir: str) -> None:
        from ray import serve

        self.service = SearchService.load(bundle, index, config, device, base_dir)
        service = self.service

        @serve.batch(max_batch_size=config.max_batch_size, batch_wait_timeout_s=config.batch_wait_ms / 1000)
        async def encode_batch(queries: list[Query]) -> list[np.ndarray]:
            return list(await asyncio.to_thread(service.encode, queries))  # torch off the replica's event loop

        self.encode = encode_batch

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_app(self.service, self.encode)


def build_application(bundle: str | Path, index: str | Path, config: ServeConfig, use_gpu: bool):
    """The Serve application: `config.replicas` replicas of `SearchReplica` behind one HTTP route."""
    from ray import serve

    deployment = serve.deployment(
        serve.ingress()(SearchReplica),
        name="ContextCirSearch",
        num_replicas=config.replicas,
        max_ongoing_requests=config.max_ongoing_requests,
        ray_actor_options={"num_cpus": config.replica_cpus, "num_gpus": 1 if use_gpu else 0},
    )
    device = "cuda" if use_gpu else "cpu"
    return deployment.bind(str(Path(bundle).resolve()), str(Path(index).resolve()), config, device, str(Path.cwd()))


def run_server(
    bundle: str | Path | None,
    index: str | Path,
    serve_config: ServeConfig,
    cluster_config: ClusterConfig,
    blocking: bool = True,
    announce: Callable[[str], None] = logger.info,
) -> str:
    """Check the inputs, connect to Ray, deploy, announce the URL and (when `blocking`) serve until Ctrl-C.

    `bundle` None serves the bundle the index records.

    Returns:
        The URL of the search page.

    Raises:
        ServeError: the bundle or index is unusable, they do not match, or the port is taken.
    """
    from cluster.runtime.ray_setup import cluster_address, connect, relative_path_problem

    problem = relative_path_problem(cluster_config, {"--bundle": str(bundle or ""), "--index": str(index)})
    if problem:
        raise ServeError(problem)
    bundle, description = check_inputs(bundle, index)
    announce(description)
    local = cluster_address(cluster_config) is None
    if local:
        check_port_free(serve_config.host, serve_config.port)
    announce(connect(cluster_config))
    from ray import serve

    host = f"[{serve_config.host}]" if ":" in serve_config.host else serve_config.host  # an IPv6 literal
    url = f"http://{host}:{serve_config.port}/"
    try:
        # Cluster-wide proxy settings; one proxy, on the head node, so the printed URL is the one that answers.
        serve.start(proxy_location="HeadOnly", http_options={"host": serve_config.host, "port": serve_config.port})
        application = build_application(bundle, index, serve_config, cluster_config.use_gpu)
        serve.run(application, name=APP_NAME, route_prefix="/")
        announce(f"serving {url}  ({serve_config.replicas} replica(s); Ctrl-C stops)")
        if not blocking:
            return url
        # `ray job stop` and service managers send SIGTERM: stop as on Ctrl-C, so a Serve application (which
        # outlives its driver on a cluster) never keeps answering after the command that started it is gone.
        signal.signal(signal.SIGTERM, _interrupt)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        announce("stopping")
        # A private head goes with this process; on a shared cluster only this application is removed.
        if local:
            serve.shutdown()
        else:
            serve.delete(APP_NAME)
    return url


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
