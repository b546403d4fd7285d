"""Test helpers: a small synthetic benchmark made by the real generator, and the scene oracle on 127.0.0.1 (stopped
by pid, even when the test fails)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def make_synthetic(root: Path, train: int = 48, val: int = 6, test: int = 6, binding: int = 4) -> Path:
    """`launch/make_synthetic.py` into `root` (small counts, the binding split included), returning `root`."""
    command = [sys.executable, str(REPO / "launch/make_synthetic.py"), "--out", str(root), "--train", str(train)]
    command += ["--val", str(val), "--test", str(test), "--binding", str(binding), "--workers", "1"]
    subprocess.run(command, check=True, capture_output=True, timeout=180)
    return root


@contextmanager
def scene_oracle(root: Path, log_dir: Path, *arguments: str, env: dict | None = None) -> Iterator[str]:
    """The scene oracle over `root` on a free 127.0.0.1 port; yields its `/v1` base URL; stopped by pid."""
    port_file = log_dir / "oracle.port"
    log = open(log_dir / "oracle.log", "w")
    command = [sys.executable, str(REPO / "launch/scene_oracle.py"), "--root", str(root), "--port", "0"]
    command += ["--port-file", str(port_file), *arguments]
    environment = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not port_file.is_file():
            assert process.poll() is None and time.monotonic() < deadline, (log_dir / "oracle.log").read_text()
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port_file.read_text()}/v1"
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()
