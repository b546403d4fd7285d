"""Ray nodes on 127.0.0.1 as separate `ray start --block` processes, and their teardown by pid.

Each node gets its own process group (`start_new_session`), its own temp dir, its own ports and custom resource
(`node_a`, `node_b`, ...), so one machine simulates a cluster whose nodes can be killed one at a time. Ray's
daemons are children of the `ray start` process; `stop` and `kill` also reach those that left its process group,
by the pids recorded while it ran (and only while each pid still names the same process).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from dist_harness import free_port

RAY = str(Path(sys.executable).with_name("ray"))
NODE_CLI = Path(__file__).with_name("ray_node_cli.py")
LOOPBACK = "127.0.0.1"


def ray_env(token: str) -> dict[str, str]:
    """Token authentication with the test's own token (never ~/.ray/auth_token), loopback only."""
    return os.environ | {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "GLOO_SOCKET_IFNAME": "lo",
    }


def _start_time(pid: int) -> str | None:
    """The start time of live process `pid` (field 22 of /proc/PID/stat), which tells a reused pid apart.

    None once it is gone or a zombie (it has exited; only its parent's wait is missing)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(parent, []).append(int(entry.name))
    return tree


def descendants(pid: int) -> list[int]:
    """Every live process below `pid`."""
    tree, found, todo = _children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class RayNode:
    """One `ray start --block` process: a head, or a node joining `head_address`."""

    def __init__(self, name: str, token: str, num_cpus: int, head_address: str | None = None) -> None:
        self.name, self.token, self.head_address = name, token, head_address
        self.temp_dir = tempfile.mkdtemp(prefix=f"ray_{name}_", dir="/tmp")  # short: socket paths have a length limit
        self.gcs_port = free_port() if head_address is None else None
        self.dashboard_port = free_port() if head_address is None else None
        self.known: dict[int, str] = {}  # pid -> start time of every process seen under this node
        self.log_path = Path(self.temp_dir) / "node.log"
        # A joining node goes through tests/support/ray_node_cli.py: plain `ray start` cannot join on loopback.
        launcher = [RAY] if head_address is None else [sys.executable, str(NODE_CLI)]
        command = [
            *launcher, "start", "--block", "--disable-usage-stats", f"--node-ip-address={LOOPBACK}",
            f"--num-cpus={num_cpus}", "--num-gpus=0", f"--resources={json.dumps({name: 1})}",
            f"--temp-dir={self.temp_dir}", f"--object-store-memory={200 * 1024 * 1024}",
            f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
        ]  # fmt: skip
        if head_address is None:
            command += [
                "--head", f"--port={self.gcs_port}", f"--dashboard-host={LOOPBACK}",
                f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={free_port()}",
            ]  # fmt: skip
        else:
            command += [f"--address={head_address}"]
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT, env=ray_env(token), start_new_session=True
        )
        self._remember(self.process.pid)

    @property
    def address(self) -> str:
        """The GCS address other nodes join."""
        return f"{LOOPBACK}:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        """The jobs API (`ray job submit --address`)."""
        return f"http://{LOOPBACK}:{self.dashboard_port}"

    def _remember(self, pid: int) -> None:
        start = _start_time(pid)
        if start is not None:
            self.known.setdefault(pid, start)

    def track(self) -> None:
        """Record this node's processes as they are now (Ray starts workers on demand)."""
        if self.process.poll() is None:
            for pid in [self.process.pid, *descendants(self.process.pid)]:
                self._remember(pid)

    def alive_nodes(self) -> list[dict]:
        """The cluster's alive nodes, from the head's State API."""
        request = urllib.request.Request(
            f"{self.dashboard}/api/v0/nodes?detail=1&limit=100", headers={"Authorization": f"Bearer {self.token}"}
        )
        reply = json.loads(urllib.request.urlopen(request, timeout=10).read())
        return [node for node in reply["data"]["result"]["result"] if node["state"] == "ALIVE"]

    def wait_for_nodes(self, resources: set[str], timeout: float = 180) -> None:
        """Wait (on the head) until alive nodes carry every custom resource in `resources`."""
        deadline, seen = time.monotonic() + timeout, set()
        while True:
            self.track()
            try:
                seen = {name for node in self.alive_nodes() for name in node.get("resources_total", {})}
                if resources <= seen:
                    return
            except OSError:
                pass  # the dashboard is not up yet
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"cluster never showed {sorted(resources)} (saw {sorted(seen)}); see {self.log_path}"
                )
            time.sleep(2)

    def kill(self) -> None:
        """SIGKILL this node's processes at once: its process group and every process recorded under it."""
        self.track()
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._kill_known()
        self.process.wait(timeout=30)
        self._wait_gone()

    def _wait_gone(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.running() and time.monotonic() < deadline:  # SIGKILL is sent, not yet carried out
            time.sleep(0.2)

    def stop(self) -> None:
        """Stop the node: SIGTERM (`ray start --block` tears down what it started), then SIGKILL what is left."""
        self.track()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # stragglers of this node only: its own process group
        except ProcessLookupError:
            pass
        self._kill_known()
        self.process.wait(timeout=30)
        self._log.close()
        self._wait_gone()

    def _kill_known(self) -> None:
        for pid, start in self.known.items():
            if _start_time(pid) == start:  # still the process we saw, not a reused pid
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def running(self) -> list[int]:
        """Processes recorded under this node that still run."""
        return [pid for pid, start in self.known.items() if _start_time(pid) == start]

    def remove(self) -> None:
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def new_token() -> str:
    return secrets.token_hex(32)
