"""`launch/bench.py gpu` runs end to end: on a machine without a GPU as its dry run at tiny sizes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # starts a local Ray for its training part
def test_the_prepared_gpu_script_dry_runs_on_cpu(tmp_path, capsys) -> None:
    spec = importlib.util.spec_from_file_location("launch_bench", REPO_ROOT / "launch" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "report.json"
    token_file = Path.home() / ".ray" / "auth_token"
    had_token = token_file.exists()
    assert module.main(["gpu", "--out", str(out), "--workdir", str(tmp_path / "work")]) == 0
    # The local Ray's token lives in the process environment only: nothing switches later `ray start`s to it.
    assert token_file.exists() == had_token
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == {"device": "cpu", "dry_run": True, "errors": [], "report": str(out)}
    report = json.loads(out.read_text())
    tiny = report["backbones"]["tiny"]
    assert tiny["step"]["cc_ratio"] > 0 and tiny["step"]["nps"] == 10
    for precision in ("fp32", "bf16"):
        assert tiny[f"fused_vs_eager_{precision}"]["grad_rel_diff"] < 1e-3  # the fused path's gradients are right
    assert report["train"]["steps"] == 3 and report["train"]["triplets_per_s"] > 0
    assert report["eval"]["images_per_s"] > 0 and report["eval"]["checkpoint_step"] == 3
