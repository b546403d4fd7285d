"""The search server as a user meets it: `launch/serve.py` in its own process group on 127.0.0.1, driven by a real
headless Chromium, by malformed requests and by 200 concurrent queries, and gone without a trace once stopped.

The server is a subprocess (its Ray head, Serve proxy and replicas live in its process group); this pytest process
never starts Ray. Refusals before Ray starts (bad bundle, mismatched index, port in use) call `main` directly.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from eval_fixtures import write_checkpoint, write_image
from figures import FIGURES, REPO_ROOT
from PIL import Image, ImageDraw

pytestmark = pytest.mark.slow  # one server start (a local Ray head and two replicas) for the whole module

GALLERY = 20
K = 10
REPLICAS = 2
QUERIES = 200
CLIENTS = 16
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENSHOT_ARTIFACT = REPO_ROOT / "runs" / "test_artifacts" / "serve_page.png"
VENV_PYTHON = REPO_ROOT / ".venv" / "bin" / "python"


def _serve_main():
    spec = importlib.util.spec_from_file_location("launch_serve", REPO_ROOT / "launch" / "serve.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _bundle(root: Path, step: int) -> Path:
    from cluster.root_config import load_config
    from training.retrieval.bundle import export_bundle

    config = load_config(REPO_ROOT / "configs" / "tiny.yaml", [f"cluster.storage_path={root / 'runs'}"])
    checkpoint = write_checkpoint(config.run_dir, step, config)  # weights seeded by the step
    out = root / f"bundle_{step}"
    export_bundle(checkpoint, out)
    return out


@dataclass
class Inputs:
    bundle: Path
    index: Path
    other_bundle: Path
    """A valid bundle of other weights: the index does not belong to it."""
    gallery: Path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Inputs:
    from training.retrieval.bundle import load_bundle
    from training.retrieval.config import IndexConfig
    from training.retrieval.gallery_build import build_index
    from training.retrieval.gallery_index import list_images, local_encoder

    root = tmp_path_factory.mktemp("serve_inputs")
    for number in range(GALLERY):
        corner = (number % 4) / 8
        write_image(root / "gallery" / f"g{number:02d}.png", 40 + number, box=(corner, 0.2, corner + 0.5, 0.8))
    bundle = _bundle(root, step=10)
    retriever = load_bundle(bundle, device="cpu")
    items = list_images(root / "gallery")
    build_index(
        root / "index", items, retriever.bundle_hash, retriever.embed_dim, IndexConfig(), local_encoder(retriever)
    )
    return Inputs(bundle, root / "index", _bundle(root, step=20), root / "gallery")


# --- the server subprocess ----------------------------------------------------------------------------------------


@dataclass
class Server:
    process: subprocess.Popen
    port: int
    log: Path
    stopped: bool = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    @property
    def pgid(self) -> int:
        """The server leads its own session and process group (start_new_session): both ids are its pid.

        Ray's core processes (GCS, raylet, dashboard) stay in that group; its workers (the Serve controller,
        proxy and replicas) each lead a group of their own, inside the same session.
        """
        return self.process.pid

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM to the server's process group; SIGKILL, by pid, to anything of its session left after that."""
        if self.stopped:  # never signal ids that the system may have handed out again
            return
        self.stopped = True
        try:
            os.killpg(self.pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            pass
        if _wait_session_gone(self.pgid, 20):
            return
        for pid in _live(session=self.pgid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait(10)
        _wait_session_gone(self.pgid, 10)


def _live(group: int | None = None, session: int | None = None) -> list[int]:
    """Pids of the live (not zombie) processes of a process group or a session, from /proc/<pid>/stat."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state, _, pgrp, sid = (entry / "stat").read_text().rpartition(")")[2].split()[:4]
        except (OSError, ValueError):  # gone meanwhile
            continue
        if state != "Z" and (int(pgrp) == group or int(sid) == session):
            pids.append(int(entry.name))
    return pids


def _wait_session_gone(sid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _live(session=sid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


@pytest.fixture(scope="module")
def server(inputs: Inputs, tmp_path_factory) -> Iterator[Server]:
    workdir = tmp_path_factory.mktemp("serve_run")
    port = _free_port()
    env = {
        key: value for key, value in os.environ.items() if key not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")
    }
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
    python = VENV_PYTHON if VENV_PYTHON.exists() else Path(sys.executable)
    command = [
        str(python),
        str(REPO_ROOT / "launch" / "serve.py"),
        "--bundle",
        str(inputs.bundle),
        "--index",
        str(inputs.index),
        "--port",
        str(port),
        "--replicas",
        str(REPLICAS),
    ]
    log = workdir / "server.log"
    with open(log, "wb") as sink:
        process = subprocess.Popen(
            command,
            cwd=workdir,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    running = Server(process, port, log)
    try:
        deadline = time.monotonic() + 150
        while not _healthy(running.url):
            if process.poll() is not None:
                pytest.fail(f"the server exited with {process.returncode}:\n{running.log_tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"the server did not answer /healthz within 150 s:\n{running.log_tail()}")
            time.sleep(0.5)
        yield running
    finally:
        running.stop()


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "healthz", timeout=2) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError):
        return False


# --- HTTP helpers -------------------------------------------------------------------------------------------------


def _multipart(fields: dict[str, str], files: dict[str, tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields.items()
    ]
    for name, (filename, content) in files.items():
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        )
        parts.append(head.encode() + content + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def _call(url: str, body: bytes | None = None, content_type: str | None = None) -> tuple[int, bytes, str]:
    """(status, body, content type) of a GET, or of a POST when `body` is given; 4xx/5xx are answers too."""
    headers = {"Content-Type": content_type} if content_type else {}
    request = urllib.request.Request(url, data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read(), response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as error:
        return error.code, error.read(), error.headers.get("Content-Type", "")


def _search(server: Server, fields: dict[str, str], files: dict[str, tuple[str, bytes]]) -> tuple[int, dict]:
    body, content_type = _multipart(fields, files)
    status, answer, _ = _call(server.url + "search", body, content_type)
    return status, json.loads(answer)


def _png(colour: tuple[int, int, int], size: int = 64) -> bytes:
    image = Image.new("RGB", (size, size), colour)
    ImageDraw.Draw(image).ellipse([size // 4, size // 4, 3 * size // 4, 3 * size // 4], fill=(240, 240, 240))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims `width` x `height` pixels in a few dozen bytes: a decompression bomb's calling card."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


# --- refusals before anything starts ------------------------------------------------------------------------------


@pytest.fixture
def no_ray(monkeypatch):
    """These commands must refuse before connecting to Ray: connecting here would start Ray inside pytest."""

    def refuse(*args, **kwargs):
        raise AssertionError("the command connected to Ray although its inputs are unusable")

    monkeypatch.setattr("cluster.runtime.ray_setup.connect", refuse)


def test_unusable_inputs_exit_2_with_one_line(inputs: Inputs, tmp_path: Path, capsys, no_ray) -> None:
    main = _serve_main()
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        cases = {
            "no bundle": ["--bundle", str(tmp_path / "missing"), "--index", str(inputs.index)],
            "no index": ["--bundle", str(inputs.bundle), "--index", str(tmp_path)],
            "mismatch": ["--bundle", str(inputs.other_bundle), "--index", str(inputs.index)],
            "bundle unknown": ["--index", str(inputs.index)],  # the index was built without recording it
            "port taken": [
                "--bundle",
                str(inputs.bundle),
                "--index",
                str(inputs.index),
                "--port",
                str(taken.getsockname()[1]),
            ],
        }
        errors = {}
        for name, argv in cases.items():
            assert main(argv) == 2, name
            errors[name] = capsys.readouterr().err.strip().splitlines()
    finally:
        taken.close()
    for name, lines in errors.items():
        assert len(lines) == 1 and lines[0].startswith("serve error: "), (name, lines)
    assert "bundle.json" in errors["no bundle"][0]
    assert "manifest.json" in errors["no index"][0]
    assert "index the gallery again" in errors["mismatch"][0]
    assert "pass --bundle" in errors["bundle unknown"][0]
    assert "cannot listen" in errors["port taken"][0]
    assert main(["--bundle", str(inputs.bundle), "--index", str(inputs.index), "--replicas", "0"]) == 2
    assert "serve.replicas" in capsys.readouterr().err


# --- the running server -------------------------------------------------------------------------------------------


def _listeners() -> list[tuple[str, int, str, int | None]]:
    """(host, port, process name, pid) of every listening TCP socket, from `ss -ltnp`."""
    output = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    found = []
    for line in output.splitlines():
        columns = line.split()
        host, _, port = columns[3].rpartition(":")
        owners = line[line.find("users:") :]
        name = owners.split('"')[1] if '"' in owners else ""
        pid = int(owners.split("pid=")[1].split(",")[0]) if "pid=" in owners else None
        found.append((host.split("%")[0], int(port), name, pid))
    return found


def _loopback(host: str) -> bool:
    return host.startswith("127.") or host in ("[::1]", "[::ffff:127.0.0.1]") or host.startswith("[::ffff:127.")


def test_listens_on_loopback_only(server: Server) -> None:
    if shutil.which("ss") is None:
        pytest.skip("`ss` (iproute2) is not installed")
    listeners = _listeners()
    on_serve_port = [(host, name) for host, port, name, _ in listeners if port == server.port]
    assert on_serve_port, f"nothing listens on {server.port}"
    assert all(host == "127.0.0.1" for host, _ in on_serve_port), on_serve_port

    def of_server(pid: int | None) -> bool:
        try:
            return pid is not None and os.getsid(pid) == server.pgid
        except ProcessLookupError:
            return False

    ours = [(host, port, name) for host, port, name, pid in listeners if of_server(pid)]
    assert any(name == "gcs_server" for _, _, name in ours) and any(port == server.port for _, port, _ in ours)
    exposed = {name for host, _, name in ours if not _loopback(host)}
    # Ray Serve binds each replica's inter-deployment gRPC server to [::]:0 in its own code (no setting moves
    # it); Ray's token authentication, which `cluster.runtime.ray_setup.connect` turns on, guards it. Nothing else of the
    # server may listen beyond loopback: not the HTTP proxy, GCS, raylet, dashboard or agents.
    assert exposed <= {"ray::ServeRepli"}, sorted(ours)


def test_page_is_self_contained(server: Server) -> None:
    status, page, content_type = _call(server.url)
    assert status == 200 and content_type.startswith("text/html")
    text = page.decode()
    assert "http://" not in text and "https://" not in text and "//cdn" not in text  # no external scripts or styles
    assert "<script src" not in text and "<link" not in text
    with urllib.request.urlopen(server.url, timeout=10) as response:
        assert "default-src 'none'" in response.headers["Content-Security-Policy"]


def test_browser_search_shows_the_results_grid(server: Server, tmp_path: Path, monkeypatch) -> None:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip(f"needs {CHROMIUM} and {CHROMEDRIVER} (Debian packages chromium, chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must never download a browser or driver
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--window-size=1280,1000",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(argument)
    reference = tmp_path / "reference.png"
    reference.write_bytes(_png((30, 90, 200)))
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        driver.get(server.url)
        wait = WebDriverWait(driver, 60)
        button, error = driver.find_element(By.ID, "search"), driver.find_element(By.ID, "error")

        def submit() -> None:
            button.click()
            wait.until(lambda _: button.is_enabled())  # disabled while the request is in flight

        def tiles():
            return driver.find_elements(By.CSS_SELECTOR, "#results .tile")

        # The server's refusal shows on the page.
        driver.find_element(By.ID, "image").send_keys(str(reference))
        submit()
        assert error.is_displayed() and "`text`" in error.text
        # A search: a grid of k tiles in rank order, every thumbnail loaded.
        driver.find_element(By.ID, "text").send_keys("make the circle larger and red")
        k_input = driver.find_element(By.ID, "k")
        k_input.clear()
        k_input.send_keys(str(K))
        submit()
        assert not error.is_displayed(), error.text
        assert len(tiles()) == K
        assert [tile.find_element(By.TAG_NAME, "b").text for tile in tiles()] == [
            f"#{rank}" for rank in range(1, K + 1)
        ]
        wait.until(
            lambda d: d.execute_script(
                "return [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)"
            )
        )
        screenshot = tmp_path / "serve_page.png"
        assert driver.save_screenshot(str(screenshot))
        SCREENSHOT_ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(screenshot, SCREENSHOT_ARTIFACT)
        with Image.open(screenshot) as shot:
            colours = np.unique(np.asarray(shot.convert("RGB")).reshape(-1, 3), axis=0)
            assert shot.size[0] >= 1000 and len(colours) > 50  # not a blank page
        # A gallery image as the reference: the reference itself is left out of its results.
        examples = driver.find_elements(By.CSS_SELECTOR, "#examples img")
        assert examples, "the page offers no gallery images"
        examples[0].click()
        submit()
        ids = [tile.find_element(By.CLASS_NAME, "id").text for tile in tiles()]
        assert len(ids) == K and "g00.png" not in ids, ids
    finally:
        driver.quit()


def test_bad_input_is_refused_with_a_message(server: Server) -> None:
    image = {"image": ("reference.png", _png((200, 40, 40)))}
    cases = {
        "20 MB upload": ({"text": "red"}, {"image": ("big.png", b"\0" * 20_000_000)}, {413}),
        "not an image": ({"text": "red"}, {"image": ("notes.png", b"just some text, not pixels\n" * 10)}, {400, 415}),
        "truncated image": ({"text": "red"}, {"image": ("cut.png", _png((1, 2, 3))[:60])}, {400}),
        "decompression bomb": ({"text": "red"}, {"image": ("bomb.png", _png_header(100_000, 100_000))}, {400}),
        "blank text": ({"text": "   "}, image, {400}),
        "text too long": ({"text": "x" * 1001}, image, {400}),
        "no text": ({}, image, {400}),
        "no image": ({"text": "red"}, {}, {400}),
        "k zero": ({"text": "red", "k": "0"}, image, {400}),
        "k not a number": ({"text": "red", "k": "ten"}, image, {400}),
        "k too large": ({"text": "red", "k": "101"}, image, {400}),
        "gallery row out of range": ({"text": "red", "gallery_row": "99999"}, {}, {400}),
    }
    for name, (fields, files, statuses) in cases.items():
        status, answer = _search(server, fields, files)
        assert status in statuses, (name, status, answer)
        assert isinstance(answer.get("error"), str) and answer["error"], (name, answer)
    status, answer, content_type = _call(server.url + "search", b'{"text": "red"}', "application/json")
    assert status == 415 and "multipart" in json.loads(answer)["error"]
    for row in ("99999", "-1", "abc", "1e3"):
        status, answer, _ = _call(server.url + f"thumb/{row}")
        assert status == 404 and json.loads(answer)["error"], row
    status, answer, content_type = _call(server.url + "thumb/3")
    assert status == 200 and content_type == "image/jpeg" and answer[:2] == b"\xff\xd8"
    status, answer, _ = _call(server.url + "healthz")
    assert status == 200 and json.loads(answer)["gallery"] == GALLERY  # still answering after all of that


def test_concurrent_queries_all_succeed(server: Server) -> None:
    colours = [(200, 40, 40), (40, 160, 60), (30, 90, 200), (220, 200, 40)]
    texts = ["make it red", "a larger circle", "same shape in green", "turn the background blue"]
    bodies = [
        _multipart({"text": texts[n % 4], "k": str(K)}, {"image": ("q.png", _png(colours[n % 4]))})
        for n in range(QUERIES)
    ]

    def one(body: tuple[bytes, str]) -> tuple[int, float, dict]:
        started = time.perf_counter()
        status, answer, _ = _call(server.url + "search", *body)
        return status, time.perf_counter() - started, json.loads(answer)

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=CLIENTS) as pool:
        outcomes = list(pool.map(one, bodies))
    wall = time.perf_counter() - started

    statuses = [status for status, _, _ in outcomes]
    assert statuses.count(200) == QUERIES, {status: statuses.count(status) for status in set(statuses)}
    assert all(len(answer["results"]) == K for _, _, answer in outcomes)
    # The same query gives the same ranking whichever replica and batch answered it.
    first = {texts[n % 4]: [hit["id"] for hit in outcomes[n][2]["results"]] for n in range(4)}
    assert all(
        [hit["id"] for hit in answer["results"]] == first[texts[n % 4]] for n, (_, _, answer) in enumerate(outcomes)
    )
    latencies = np.array([seconds for _, seconds, _ in outcomes]) * 1000
    server_side = np.median([answer["took_ms"] for _, _, answer in outcomes])
    FIGURES.append(
        f"serve: {QUERIES} queries from {CLIENTS} clients on {REPLICAS} replicas (ContextTiny, CPU): "
        f"p50 {np.percentile(latencies, 50):.0f} ms, p95 {np.percentile(latencies, 95):.0f} ms, "
        f"{QUERIES / wall:.0f} queries/s; median server-side {server_side:.0f} ms"
    )


def test_stopping_leaves_no_process(server: Server) -> None:
    """Runs last: stops the module's server (the fixture's teardown then finds nothing to do)."""
    assert server.process.poll() is None, f"the server died during the tests:\n{server.log_tail()}"
    server.stop()
    assert not _live(group=server.pgid), "processes of the server's group survived SIGTERM and SIGKILL"
    assert not _live(session=server.pgid), "Ray workers of the server's session outlived it"
    assert not _healthy(server.url)
    assert not (Path.home() / ".ray" / "auth_token").exists()  # the token lived in the server's environment only
