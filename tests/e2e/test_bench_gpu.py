"""`launch/bench.py gpu` runs end to end: on a machine without a GPU as its dry run at tiny sizes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # starts a local Ray for its training part
def test_the_prepared_gpu_script_dry_runs_on_cpu(tmp_path) -> None:
    out = tmp_path / "report.json"
    token_file = Path.home() / ".ray" / "auth_token"
    had_token = token_file.exists()
    # As users run it: its own interpreter, so Ray is first imported after the script has set up its auth.
    env = {name: value for name, value in os.environ.items() if not name.startswith("RAY_AUTH")}
    done = subprocess.run(
        [sys.executable, "launch/bench.py", "gpu", "--out", str(out), "--workdir", str(tmp_path / "work")],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    printed = json.loads(done.stdout.strip().splitlines()[-1])
    assert printed == {"device": "cpu", "dry_run": True, "errors": [], "report": str(out)}
    # The local Ray's token lives in the process environment only: nothing switches later `ray start`s to it.
    assert token_file.exists() == had_token
    report = json.loads(out.read_text())
    tiny = report["backbones"]["tiny"]
    assert tiny["step"]["cc_ratio"] > 0 and tiny["step"]["nps"] == 10
    for precision in ("fp32", "bf16"):
        assert tiny[f"fused_vs_eager_{precision}"]["grad_rel_diff"] < 1e-3  # the fused path's gradients are right
    assert report["train"]["steps"] == 3 and report["train"]["triplets_per_s"] > 0
    assert report["eval"]["images_per_s"] > 0 and report["eval"]["checkpoint_step"] == 3
