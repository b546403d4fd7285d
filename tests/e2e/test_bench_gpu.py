"""`launch/bench.py gpu` as the one GPU run will use it: its preflight stops a machine without a usable GPU at once,
`--dry-run` runs every section on the CPU, and a run cut short (by a kill or by its budget) leaves a report that
holds every figure measured and says what was not reached."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
SECTIONS = ["ViT-H-14", "ViT-L-14", "ViT-B-16", "ray_deepspeed", "eval"]
STEP_FIGURES = {"step_s", "step_median_s", "repeats", "triplets_per_s", "peak_mem_gb", "step_tflops", "mfu"}


def _environment() -> dict[str, str]:
    # As users run it: its own interpreter, so Ray is first imported after the script has set up its auth.
    return {name: value for name, value in os.environ.items() if not name.startswith("RAY_AUTH")}


def _bench(tmp_path: Path, *flags: str, timeout: float = 600) -> subprocess.CompletedProcess:
    command = [sys.executable, "launch/bench.py", "gpu", "--out", str(tmp_path / "report.json")]
    command += ["--workdir", str(tmp_path / "work"), *flags]
    return subprocess.run(command, cwd=REPO_ROOT, env=_environment(), capture_output=True, text=True, timeout=timeout)


def _section_lines(stderr: str) -> dict[str, str]:
    """The bench's line per section (tqdm bars share stderr: split on carriage returns too)."""
    lines = stderr.replace("\r", "\n").splitlines()
    return {name: line for line in lines for name in SECTIONS if line.startswith(f"{name}: ")}


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine with a usable GPU passes the CUDA check")
def test_without_a_gpu_the_bench_stops_with_one_line_instead_of_dry_running(tmp_path):
    done = _bench(tmp_path, timeout=120)
    assert done.returncode == 3, done.stderr[-2000:]
    assert done.stdout == ""
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("preflight: no usable GPU") and "--dry-run" in line
    assert "failed" in json.loads((tmp_path / "report.json").read_text())["preflight"]


@pytest.mark.slow  # starts a local Ray for its training part
def test_the_prepared_gpu_script_dry_runs_every_section_on_cpu(tmp_path) -> None:
    token_file = Path.home() / ".ray" / "auth_token"
    had_token = token_file.exists()
    done = _bench(tmp_path, "--dry-run")
    assert done.returncode == 0, done.stderr[-3000:]
    printed = json.loads(done.stdout.strip().splitlines()[-1])
    assert {name: printed[name] for name in ("device", "dry_run", "failed", "not_reached", "report")} == {
        "device": "cpu (dry run)",
        "dry_run": True,
        "failed": [],
        "not_reached": [],
        "report": str(tmp_path / "report.json"),
    }
    lines = _section_lines(done.stderr)
    assert sorted(lines) == sorted(SECTIONS) and all(": done in " in line for line in lines.values())
    # The local Ray's token lives in the process environment only: nothing switches later `ray start`s to it.
    assert token_file.exists() == had_token

    report = json.loads((tmp_path / "report.json").read_text())
    assert report["dry_run"] is True and report["finished"] is True and "peak_mem_gb" in report["labels"]
    assert list(report["sections"]) == SECTIONS
    for name in SECTIONS[:3]:  # each backbone's step, at a tiny width of its own patch size
        section = report["sections"][name]
        figures = section["figures"]
        assert section["status"] == "done" and figures["backbone"] == f"{name}-tiny-width"
        for mode in ("on", "off"):
            assert set(figures[f"checkpointing_{mode}"]) == STEP_FIGURES  # a GPU run's layout, nulls included
            assert figures[f"checkpointing_{mode}"]["step_s"] > 0
        assert figures["variants"]["cc_ratio"] > 0 and figures["variants"]["nps"] == 10
        assert figures["fused_vs_eager_fp32"]["grad_rel_diff"] < 1e-3  # the fused path's gradients are right
        for check in ("fused_vs_eager_bf16", "fused_bf16_vs_eager_fp32", "eager_bf16_vs_eager_fp32"):
            assert figures[check]["grad_rel_diff"] < 0.1
    training = report["sections"]["ray_deepspeed"]["figures"]
    assert training["setup"]["zero_stage"] == 1 and training["setup"]["resource_wait_s"] == 60
    assert training["run"]["steps"] == 3 and training["run"]["triplets_per_s"] > 0
    assert 0 <= training["run"]["median_data_wait_share"] <= 1  # metrics.jsonl records the data wait
    evaluated = report["sections"]["eval"]["figures"]
    assert evaluated["checkpoint_step"] == 3
    assert evaluated["encode"]["batches"] >= 20 and evaluated["encode"]["images_per_s"] > 0
    assert evaluated["decode"]["images_per_s"] > 0


@pytest.mark.slow  # half a minute of tiny steps
def test_a_dry_run_killed_midway_leaves_every_figure_it_measured(tmp_path) -> None:
    out = tmp_path / "report.json"
    command = [sys.executable, "launch/bench.py", "gpu", "--dry-run", "--out", str(out)]
    command += ["--workdir", str(tmp_path / "work")]
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    bench = subprocess.Popen(command, cwd=REPO_ROOT, env=_environment(), start_new_session=True, **quiet)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and bench.poll() is None:
            if out.is_file() and json.loads(out.read_text())["sections"]["ViT-H-14"]["status"] == "done":
                break
            time.sleep(0.2)
    finally:
        os.killpg(bench.pid, signal.SIGKILL)  # the time limit's kill: no cleanup runs, the data child goes too
        bench.wait()
    report = json.loads(out.read_text())  # every write was whole: the file parses
    assert report["finished"] is False and list(report["sections"]) == SECTIONS
    first = report["sections"]["ViT-H-14"]
    assert first["status"] == "done" and first["figures"]["checkpointing_on"]["step_s"] > 0
    statuses = [entry["status"] for entry in report["sections"].values()]
    assert set(statuses) <= {"done", "started, not finished", "not reached"}
    assert statuses[-2:] == ["not reached", "not reached"]


@pytest.mark.slow  # about half a minute of tiny steps
def test_a_budget_too_small_for_training_skips_it_and_says_why(tmp_path) -> None:
    done = _bench(tmp_path, "--dry-run", "--budget-s", "40")
    assert done.returncode == 0, done.stderr[-3000:]
    printed = json.loads(done.stdout.strip().splitlines()[-1])
    assert printed["failed"] == [] and printed["not_reached"][-2:] == ["ray_deepspeed", "eval"]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["finished"] is True and report["budget_s"] == 40
    assert report["sections"]["ViT-H-14"]["status"] == "done"
    training = report["sections"]["ray_deepspeed"]
    assert training["status"] == "not reached" and training["reason"].startswith("budget: ")
    assert _section_lines(done.stderr)["ray_deepspeed"].startswith("ray_deepspeed: not reached (budget: ")
