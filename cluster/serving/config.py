"""Config section `serve`: where the search server listens, how wide it runs, what it accepts. Imports no ray."""

from __future__ import annotations

from dataclasses import dataclass

FORM_SLACK_BYTES = 64 * 1024
"""Room in a request body, beyond the image itself, for the text fields and the multipart framing."""


@dataclass
class ServeConfig:
    """The search server (`launch/serve.py`): where it listens, how wide it runs, what it accepts."""

    host: str = "127.0.0.1"
    """Address the Serve HTTP proxy binds. Keep loopback unless an authenticating proxy sits in front."""
    port: int = 8000
    replicas: int = 1
    """Serve replicas, each holding the query encoder and the index (one GPU each when `cluster.use_gpu`)."""
    replica_cpus: float = 1.0
    """CPU cores Ray reserves per replica."""
    max_ongoing_requests: int = 16
    """Requests one replica works on at once; more wait in the proxy."""
    max_batch_size: int = 8
    """Concurrent queries a replica encodes in one forward pass."""
    batch_wait_ms: float = 5.0
    """How long a replica waits for a batch to fill before encoding what it has (ms)."""
    max_upload_mb: float = 10.0
    """Largest accepted request body (MiB); larger uploads get 413."""
    max_pixels: int = 40_000_000
    """Largest accepted image (width x height) before decoding: guards against decompression bombs."""
    max_text_chars: int = 1000
    top_k: int = 20
    """Results per query when the request gives no `k`."""
    max_k: int = 100
    thumb_size: int = 160
    """Longest side of the thumbnails /thumb serves (pixels)."""
    thumb_cache: int = 2048
    """Thumbnails each replica keeps in memory."""

    def __post_init__(self) -> None:
        if not self.host:
            raise ValueError("serve.host must be an address, e.g. 127.0.0.1")
        if not 0 < self.port < 65536:
            raise ValueError(f"serve.port={self.port} must be in 1..65535")
        for key in ("replicas", "max_ongoing_requests", "max_batch_size", "max_pixels", "max_text_chars"):
            if getattr(self, key) < 1:
                raise ValueError(f"serve.{key}={getattr(self, key)} must be >= 1")
        for key in ("replica_cpus", "max_upload_mb"):
            if getattr(self, key) <= 0:
                raise ValueError(f"serve.{key}={getattr(self, key)} must be positive")
        if self.batch_wait_ms < 0 or self.thumb_cache < 0:
            raise ValueError("serve.batch_wait_ms and serve.thumb_cache must be >= 0")
        if not 1 <= self.top_k <= self.max_k:
            raise ValueError(f"serve.top_k={self.top_k} must be in 1..serve.max_k={self.max_k}")
        if not 16 <= self.thumb_size <= 1024:
            raise ValueError(f"serve.thumb_size={self.thumb_size} must be in 16..1024")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20) + FORM_SLACK_BYTES
