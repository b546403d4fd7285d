"""Object-storage servers for tests, all on 127.0.0.1: moto's S3-compatible server as a subprocess, and a small
http server that answers byte ranges, logs every request and fails on demand (503s, 404s)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

LOOPBACK = "127.0.0.1"
FAKE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def moto_server(log: Path) -> Iterator[str]:
    """A moto S3 server on a free loopback port; yields its endpoint URL and stops it (by its own process group)."""
    port = free_port()
    with open(log, "w") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", LOOPBACK, "-p", str(port)],
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), timeout=1):
                break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"moto server did not start; see {log}")
            time.sleep(0.2)
        yield f"http://{LOOPBACK}:{port}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@dataclass
class Served:
    method: str
    path: str
    start: int | None
    length: int
    status: int


class RangeServer:
    """Serves the files of `root` over http with single byte ranges, as object stores do.

    `fail` maps a path to how many of its next GETs answer 503, `forbid` holds paths that answer 403; every request
    is appended to `log`.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.fail: dict[str, int] = {}
        self.forbid: set[str] = set()
        self.log: list[Served] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet: the test reads `server.log`
                pass

            def do_HEAD(self) -> None:
                self._answer(body=False)

            def do_GET(self) -> None:
                self._answer(body=True)

            def _answer(self, body: bool) -> None:
                name = self.path.lstrip("/")
                file = server.root / name
                if body and server.fail.get(name, 0) > 0:
                    server.fail[name] -= 1
                    server.log.append(Served(self.command, name, None, 0, 503))
                    self.send_error(503)
                    return
                if name in server.forbid:
                    server.log.append(Served(self.command, name, None, 0, 403))
                    self.send_error(403)
                    return
                if ".." in name or not file.is_file():
                    server.log.append(Served(self.command, name, None, 0, 404))
                    self.send_error(404)
                    return
                data = file.read_bytes()
                match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
                start, status = 0, 200
                if match:
                    start = int(match.group(1))
                    end = int(match.group(2)) + 1 if match.group(2) else len(data)
                    data, status = data[start:end], 206
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{start + len(data) - 1}/{file.stat().st_size}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                server.log.append(
                    Served(self.command, name, start if match else None, len(data) if body else 0, status)
                )
                if body:
                    self.wfile.write(data)

        self.httpd = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.url = f"http://{LOOPBACK}:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> RangeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)
