"""Every entry script answers `--help` with exit 0 and no traceback, and a wrong flag with exit 2 and one line,
run as a user runs them: `python launch/<name>.py` in a fresh interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(path.name for path in (REPO_ROOT / "launch").glob("*.py"))


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=180, env=dict(os.environ)
    )


@pytest.fixture(scope="module")
def answers() -> dict[tuple[str, str], subprocess.CompletedProcess]:
    """(script, --help | a wrong flag) -> what the script did; two at a time, one interpreter each."""
    calls = [(script, flag) for script in SCRIPTS for flag in ("--help", "--no-such-flag")]
    with ThreadPoolExecutor(max_workers=2) as pool:
        done = pool.map(lambda call: _run(f"launch/{call[0]}", call[1]), calls)
    return dict(zip(calls, done))


def test_every_entry_script_is_covered() -> None:
    assert {"train.py", "eval.py", "build_shards.py", "bench.py", "generate.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_exits_zero_without_a_traceback(answers, script: str) -> None:
    result = answers[(script, "--help")]
    assert result.returncode == 0, f"{script} --help exited {result.returncode}:\n{result.stderr[-2000:]}"
    assert "Traceback" not in result.stdout + result.stderr, result.stderr[-2000:]
    assert "usage:" in result.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_wrong_flag_is_one_line_and_exit_two(answers, script: str) -> None:
    result = answers[(script, "--no-such-flag")]
    assert result.returncode == 2, f"{script} --no-such-flag exited {result.returncode}:\n{result.stderr[-2000:]}"
    assert "Traceback" not in result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"{script}: {lines}"
    assert lines[0].startswith(f"{script}: error: "), lines[0]


def test_a_bench_subcommand_has_its_own_help() -> None:
    result = _run("launch/bench.py", "gpu", "--help")
    assert result.returncode == 0, result.stderr
    assert "--out" in result.stdout and "benchmark: gpu" in result.stdout
