"""Where a shard set lives: a local directory, or an object-store prefix read and written through fsspec.

`data.shards_dir` is either a path or a URL: `s3://bucket/prefix`, `gs://bucket/prefix`, `http(s)://host/prefix`
(read only), or any fsspec URL (`memory://`, a `simplecache::s3://...` chain that keeps whole shards on local
disk). `data.storage_options` passes keyword arguments to the filesystem (an S3 `endpoint_url`, a GCS
`project`); credentials come from the usual environment of each store (`AWS_ACCESS_KEY_ID`, ...), never config.

Remote shards are never downloaded whole before use: a shard opens as a seekable file that fetches byte ranges as
the tar reader asks for them, so a slot that starts mid-shard seeks straight to its first sample (the sidecar
records each sample's byte offset). Transient errors (connection resets, timeouts, 429/5xx surfacing as OSError)
are retried with exponential backoff, re-opening the object and seeking back to where the read was; a permanent
error (no such object, no permission) or retries used up raise `ShardStorageError` naming the URL.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

logger = logging.getLogger(__name__)

PERMANENT_ERRORS: tuple[type[BaseException], ...] = (FileNotFoundError, PermissionError, IsADirectoryError)
"""Errors that another attempt cannot mend."""


class ShardStorageError(RuntimeError):
    """A shard or index could not be read or written; the message names the URL or path.

    Deliberately not an OSError: a reader counts OSErrors inside a tar as a truncated shard and goes on, while a
    store that refuses every read must stop the job with its reason. `permanent` (no such object, no permission)
    tells the cluster's failure policy that restarting the workers cannot help; an outage that outlasted the
    retries may be over by the next attempt.
    """

    def __init__(self, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


def is_url(location: str) -> bool:
    """True for `scheme://...` (and fsspec chains `a::b://...`); a Windows drive letter is not a scheme."""
    head, separator, _ = location.partition("://")
    return bool(separator) and len(head) > 1


def _permanent(error: BaseException) -> bool:
    """No such object, no permission, or an http answer in 4xx other than 408/429 (fsspec raises aiohttp's
    `ClientResponseError` for every status but 404)."""
    cause = error.__cause__
    if isinstance(error, FileNotFoundError) and cause is not None and not isinstance(cause, FileNotFoundError):
        return _permanent(cause)  # fsspec's http `info` reports every failure as "not found"; the cause tells
    if isinstance(error, PERMANENT_ERRORS):
        return True
    status = getattr(error, "status", None)
    return isinstance(status, int) and 400 <= status < 500 and status not in (408, 429)


def _raise_unless_absent(error: FileNotFoundError) -> None:
    """Return when the object is really absent; raise the cause when "not found" hides a transient failure (fsspec's
    http filesystem reports every failed probe so), so that `ShardStore._retry` retries it."""
    if not _permanent(error):
        raise error.__cause__ from None


def _transient_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError, TimeoutError, ConnectionError]
    try:  # http(s) and the async object stores raise aiohttp's errors, which are not all OSErrors
        import aiohttp

        errors.append(aiohttp.ClientError)
    except ImportError:  # pragma: no cover - aiohttp comes with ray[default]
        pass
    return tuple(errors)


@dataclass(frozen=True)
class ShardStore:
    """A shard set's location plus how to reach it; picklable, so loader processes get their own copy."""

    location: str
    options: dict[str, Any] = field(default_factory=dict, hash=False, compare=False, repr=False)
    """fsspec storage options (`data.storage_options`)."""
    retries: int = 5
    """Attempts after the first on a transient error."""
    backoff_s: float = 0.5
    """First wait; doubled per attempt, with jitter, up to 30 s."""
    block_size: int = 1 << 20
    """Bytes per range request of a remote read."""

    @property
    def remote(self) -> bool:
        return is_url(self.location)

    @property
    def listable(self) -> bool:
        """Object stores list a prefix in one request; a plain http(s) server has no listing to trust."""
        return self.remote and not self.location.rsplit("::", 1)[-1].startswith(("http://", "https://"))

    def where(self, name: str = "") -> str:
        """The URL or path of `name` in the store, for messages and fsspec."""
        if not name:
            return self.location
        if self.remote:
            return self.location.rstrip("/") + "/" + name
        return str(Path(self.location) / name)

    def _fs(self):
        import fsspec

        filesystem, root = fsspec.core.url_to_fs(self.location, **self.options)
        return filesystem, root.rstrip("/")

    def _retry(self, what: str, action: Callable[[], Any]) -> Any:
        transient = _transient_errors()
        for attempt in range(self.retries + 1):
            try:
                return action()
            except transient as error:
                if _permanent(error):
                    cause = f" ({type(error.__cause__).__name__}: {error.__cause__})" if error.__cause__ else ""
                    raise ShardStorageError(
                        f"{what}: {type(error).__name__}: {error}{cause}", permanent=True
                    ) from error
                if attempt == self.retries:
                    raise ShardStorageError(
                        f"{what}: {type(error).__name__}: {error} (gave up after {self.retries + 1} attempts)"
                    ) from error
                wait = min(30.0, self.backoff_s * 2**attempt) * (0.5 + random.random() / 2)
                logger.warning("%s: %s: %s; retrying in %.1f s", what, type(error).__name__, error, wait)
                time.sleep(wait)
        raise AssertionError("unreachable")

    def exists(self, name: str) -> bool:
        """Whether `name` is there. An error that is not "no such object" is retried, then raised: an outage must
        never read as a missing shard."""
        if not self.remote:
            return Path(self.where(name)).is_file()
        filesystem, root = self._fs()

        def probe() -> bool:
            try:
                filesystem.info(f"{root}/{name}")
            except FileNotFoundError as error:
                _raise_unless_absent(error)
                return False
            return True

        return bool(self._retry(f"checking {self.where(name)}", probe))

    def read_bytes(self, name: str) -> bytes:
        """The whole of a small object (an index, a sidecar); FileNotFoundError when absent."""
        if not self.remote:
            return Path(self.where(name)).read_bytes()
        filesystem, root = self._fs()
        absent = False

        def fetch() -> bytes:
            nonlocal absent
            try:
                return filesystem.cat_file(f"{root}/{name}")
            except FileNotFoundError as error:
                _raise_unless_absent(error)
                absent = True
                return b""

        data = self._retry(f"reading {self.where(name)}", fetch)
        if absent:
            raise FileNotFoundError(self.where(name))
        return data

    def open(self, name: str) -> BinaryIO:
        """A seekable binary reader of `name`: a plain file locally, ranged and retried remotely."""
        if not self.remote:
            return open(self.where(name), "rb")  # noqa: SIM115 - the caller closes it
        return RangedReader(self, name)

    def names(self) -> list[str]:
        """Base names of the objects directly under the location (remote stores only)."""
        filesystem, root = self._fs()

        def listing() -> list:
            try:
                return filesystem.ls(root, detail=False)
            except FileNotFoundError:  # an empty prefix
                return []

        listed = self._retry(f"listing {self.location}", listing)
        return sorted(str(entry).rstrip("/").rsplit("/", 1)[-1] for entry in listed)

    def upload(self, local: Path, name: str) -> None:
        """Copy a local file to `name`; an object store makes it visible whole or not at all."""
        filesystem, root = self._fs()
        self._retry(f"writing {self.where(name)}", lambda: filesystem.put_file(str(local), f"{root}/{name}"))

    def remove(self, name: str) -> None:
        filesystem, root = self._fs()
        self._retry(f"removing {self.where(name)}", lambda: filesystem.rm_file(f"{root}/{name}"))


class RangedReader:
    """A read-only, seekable view of a remote object whose reads survive transient errors.

    fsspec's buffered file fetches `block_size` byte ranges on demand. When a read fails with a transient error,
    this view re-opens the object, seeks back to its own position and tries again (`ShardStore.retries` times).
    """

    def __init__(self, store: ShardStore, name: str) -> None:
        self.store, self.name = store, name
        self.url = store.where(name)
        self.position = 0
        self._handle = None
        self._attempt(f"opening {self.url}", lambda handle: None)  # a missing object fails here, by name

    def _attempt(self, what: str, action: Callable[[Any], Any]) -> Any:
        def once() -> Any:
            if self._handle is None:
                filesystem, root = self.store._fs()
                self._handle = filesystem.open(
                    f"{root}/{self.name}", "rb", block_size=self.store.block_size, cache_type="readahead"
                )
            try:
                return action(self._handle)
            except BaseException:
                self._discard()  # the next attempt starts from a fresh connection
                raise

        return self.store._retry(what, once)

    def read(self, size: int = -1) -> bytes:
        def from_position(handle) -> bytes:
            handle.seek(self.position)
            return handle.read(size)

        data = self._attempt(f"reading {self.url} at byte {self.position}", from_position)
        self.position += len(data)
        return data

    def _discard(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            try:
                handle.close()
            except Exception:  # a broken connection may fail to close too; the handle is dropped either way
                pass

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_SET:
            self.position = offset
        elif whence == os.SEEK_CUR:
            self.position += offset
        else:
            self.position = int(self._attempt(f"opening {self.url}", lambda handle: handle.size)) + offset
        return self.position

    def tell(self) -> int:
        return self.position

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._discard()

    def __enter__(self) -> RangedReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
