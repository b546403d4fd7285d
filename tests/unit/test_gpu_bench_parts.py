"""The parts of `launch/bench.py gpu` that decide whether the one GPU run is wasted: the preflight's one-line
failures, the report written as figures come, and the time budget's plan (no GPU and no Ray needed)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch

from cluster.bench.gpu_budget import Budget, SectionCost
from cluster.bench.gpu_preflight import (
    LoaderNeeds,
    PreflightFailed,
    check_cuda,
    check_ray_gpu,
    check_shm,
    image_batch_bytes,
)
from cluster.bench.gpu_report import DONE, FAILED, NOT_REACHED, RUNNING, BenchReport

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without usable CUDA shows")


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _costs() -> dict[str, SectionCost]:
    return {
        "big": SectionCost(40.0, 10.0, 1, 3),
        "middle": SectionCost(20.0, 5.0, 1, 3),
        "train": SectionCost(50.0, 1.0, 10, 100, "steps"),
    }


def test_a_roomy_budget_gives_every_section_its_most_units():
    budget = Budget(1000.0, _costs(), clock=_Clock())
    assert [budget.plan(name).units for name in ("big", "middle", "train")] == [3, 3, 100]


def test_a_tight_budget_cuts_repeats_before_sections_and_keeps_the_later_ones_smallest_forms():
    clock = _Clock()
    budget = Budget(150.0, _costs(), clock=clock)
    # 150 s: the later sections need 25 + 60 s at least, so the first gets (150 - 85 - 40) / 10 = 2 repeats.
    plan = budget.plan("big")
    assert (plan.units, plan.planned_s) == (2, 60.0)
    clock.now = 60.0
    assert budget.plan("middle").units == 2  # 90 s left, 60 kept for the last: (30 - 20) / 5
    clock.now = 145.0
    assert budget.plan("train") is None  # 5 s left, 60 s needed: not started
    assert budget.refusal("train") == "budget: 5 s left, the section needs about 60 s"


def test_a_measured_cost_replaces_the_guess():
    budget = Budget(200.0, _costs(), clock=_Clock())
    budget.update("train", unit_s=0.5)
    budget.update("train", unit_s=float("nan"))  # a missing measurement keeps the last cost
    assert budget.costs["train"].unit_s == 0.5


def test_the_report_is_valid_json_at_every_moment_and_says_what_is_missing(tmp_path):
    out = tmp_path / "deep" / "report.json"
    report = BenchReport(out, {"device": "x"}, {"one": {"measures": "a"}, "two": {}, "three": {}})
    written = json.loads(out.read_text())
    assert [entry["status"] for entry in written["sections"].values()] == [NOT_REACHED] * 3
    assert list(written["sections"]) == ["one", "two", "three"]  # the order they run in

    with report.running("one", repeats=2):
        report.figure("one", "step_s", 0.25)
        during = json.loads(out.read_text())["sections"]["one"]  # a kill now keeps the figure
        assert during["status"] == RUNNING and during["figures"] == {"step_s": 0.25} and during["repeats"] == 2
    with report.running("two"):
        raise RuntimeError("CUDA out of memory in a one-line message")
    report.skip("three", "budget: 3 s left")
    report.finish()

    final = json.loads(out.read_text())
    assert final["finished"] is True and final["device"] == "x"
    one, two, three = (final["sections"][name] for name in ("one", "two", "three"))
    assert one["status"] == DONE and one["seconds"] >= 0
    assert two["status"] == FAILED and two["error"].endswith("CUDA out of memory in a one-line message")
    assert three["status"] == NOT_REACHED and three["reason"] == "budget: 3 s left"
    assert report.failed_sections() == ["two"]
    assert sorted(path.name for path in out.parent.iterdir()) == ["report.json"]  # no partial files left


def test_the_loader_estimate_is_the_shared_memory_the_issue_measured():
    # vitb.yaml's loader: 6 workers x 4 prefetched batches of 64 triplets (two 224-px images each). The issue
    # measured 1.85 GB of float32 batches; the loaders now hand over uint8 pixels, a quarter of that.
    float32 = LoaderNeeds("training", 6, 4, image_batch_bytes(64, 2, 224, bytes_per_value=4))
    assert float32.bytes / 1e9 == pytest.approx(1.85, abs=0.01)
    training = LoaderNeeds("training", 6, 4, image_batch_bytes(64, 2, 224))
    assert training.bytes * 4 == float32.bytes
    assert "6 workers x 4 batches" in training.describe()


def test_short_shared_memory_stops_the_bench_in_one_line(tmp_path):
    huge = LoaderNeeds("training", 12, 4, 2**50)
    with pytest.raises(PreflightFailed) as failed:
        check_shm([LoaderNeeds("eval", 1, 2, 1), huge], path=tmp_path)
    message = str(failed.value)
    assert "\n" not in message and "--shm-size" in message and "12 workers" in message
    assert check_shm([LoaderNeeds("eval", 1, 2, 1024)], path=tmp_path)["shm_needed_gb"] >= 0


@no_gpu
def test_without_nvidia_smi_the_cuda_check_says_there_is_no_gpu(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi anywhere
    with pytest.raises(PreflightFailed, match=r"no usable GPU: nvidia-smi not found .* sees no CUDA device"):
        check_cuda()


@no_gpu
def test_a_driver_torch_cannot_use_is_named_with_the_cuda_torch_was_built_for(monkeypatch, tmp_path):
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 470.57.02\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(PreflightFailed) as failed:
        check_cuda()
    message = str(failed.value)
    assert message.startswith("CUDA not usable: NVIDIA driver 470.57.02") and "\n" not in message
    assert f"built for CUDA {torch.version.cuda}" in message


def test_a_ray_that_would_see_no_gpu_stops_the_bench(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # what Ray reads: no GPU for it on any machine
    with pytest.raises(PreflightFailed, match=r"a local Ray would see 0 GPU\(s\) \(CUDA_VISIBLE_DEVICES=''"):
        check_ray_gpu()
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # joining a cluster: its GPUs are not this machine's
    assert check_ray_gpu()["ray_gpus"].startswith("not checked")


def test_the_dry_run_names_each_backbone_at_a_tiny_width(tmp_path):
    from cluster.bench.gpu_bench import tiny_width
    from shards.model_inputs import image_size, model_config

    name = tiny_width("ViT-H-14", tmp_path)
    config = model_config(name)
    assert name == "ViT-H-14-tiny-width" and Path(tmp_path / f"{name}.json").is_file()
    assert config["vision_cfg"]["patch_size"] == 14 and config["vision_cfg"]["width"] == 64
    assert image_size(name) == 56  # a 4 x 4 patch grid
