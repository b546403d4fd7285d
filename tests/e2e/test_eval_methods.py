"""`launch/eval.py --methods`: every method in one run and one table (DESIGN section 13), each method's results,
predictions and TensorBoard scalars, CVSI's texts cached so that a rerun asks nothing, and clear errors."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from eval_fixtures import eval_main, write_checkpoint, write_method_checkpoint
from oracle_fixtures import make_synthetic, scene_oracle

from cluster.root_config import load_config

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny.yaml")
ALL = "context,image_only,text_only,sum,phi,cvsi,tiscir"
OTHERS = ("image_only", "text_only", "image_text_sum", "phi", "cvsi", "tiscir")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("methods")
    root = make_synthetic(base / "synthetic")
    common = [f"cluster.storage_path={base / 'runs'}", "model.weights_file=null", "model.init_from=null"]
    phi = load_config(REPO / "configs" / "phi_tiny.yaml", [*common, "cluster.run_name=phi"])
    tiscir = load_config(REPO / "configs" / "tiscir_tiny.yaml", [*common, "cluster.run_name=tiscir"])
    write_method_checkpoint(phi.run_dir, 4, phi)
    write_method_checkpoint(tiscir.run_dir, 4, tiscir)
    with scene_oracle(root, base) as endpoint:
        yield {
            "base": base,
            "root": root,
            "endpoint": endpoint,
            "phi": phi.run_dir / "checkpoints" / "latest",
            "tiscir": tiscir.run_dir / "checkpoints" / "latest",
        }


def _overrides(tmp_path: Path, world: dict, endpoint: str | None = None) -> list[str]:
    endpoint = endpoint or world["endpoint"]
    return [
        f"cluster.storage_path={tmp_path / 'runs'}",
        f"eval.datasets.synthetic.root={world['root']}",
        "eval.loader_workers=0",
        "eval.batch_size=8",
        "eval.device=cpu",
        f"methods.phi.checkpoint={world['phi']}",
        f"methods.tiscir.checkpoint={world['tiscir']}",
        f"methods.cvsi.captioner_endpoint={endpoint}",
        f"methods.cvsi.editor_endpoint={endpoint}",
        f"methods.cvsi.cache_dir={tmp_path / 'cvsi_cache'}",
        "methods.cvsi.max_retries=0",
        "methods.cvsi.timeout_s=5",
    ]


@pytest.mark.slow
def test_every_method_in_one_table_with_results_predictions_and_scalars(tmp_path, world, capsys, caplog) -> None:
    overrides = _overrides(tmp_path, world)
    config = load_config(TINY, overrides)
    write_checkpoint(config.run_dir, 10, config)
    latest = str(config.run_dir / "checkpoints" / "latest")
    main = eval_main()
    caplog.set_level(logging.INFO, logger="training.evaluation.methods.cvsi")
    assert main(["--config", TINY, "--checkpoint", latest, "--methods", ALL, *overrides]) == 0
    first_calls = int(re.search(r", (\d+) captioner/LLM calls", caplog.text).group(1))
    printed = capsys.readouterr().out
    header = next(line for line in printed.splitlines() if line.strip().startswith("metric"))
    assert header.split()[1:] == ["context", *OTHERS]
    result = json.loads((config.run_dir / "eval" / "step_00000010.json").read_text())
    entry = result["benchmarks"]["synthetic"]
    assert list(entry["baselines"]) == list(OTHERS)
    queries, gallery = entry["version"]["queries"], entry["version"]["gallery"]
    binding = entry["diagnostics"]["binding"]
    assert first_calls >= gallery + queries  # the first run asked for every image's captions and every edit
    for name in OTHERS:
        metrics = entry["baselines"][name]
        assert {"recall@1", "recall@5", "recall@10", "recall_subset@1", "binding/recall@1"} <= set(metrics), name
        predictions = json.loads(Path(entry["method_predictions"][name]).read_text())
        val = {key: ranked for key, ranked in predictions.items() if not key.startswith("binding/")}
        assert len(val) == queries and all(len(ranked) == min(50, gallery - 1) for ranked in val.values())
        assert len(predictions) - len(val) == binding["queries"]
    assert entry["baselines"]["cvsi"] != entry["baselines"]["phi"]  # the captions and edits change the ranking

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(config.run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for name in ("context", *OTHERS):
        assert f"eval/synthetic/{name}/recall@1" in tags, name
    assert "eval/synthetic/recall@1" in tags  # the model's own, as before

    # A rerun with nothing listening asks nothing: every caption and edit comes from the cache, same scores.
    rerun = _overrides(tmp_path, world, endpoint="http://127.0.0.1:9/v1")
    again = tmp_path / "again"
    config_again = load_config(TINY, [*rerun, f"cluster.storage_path={again}"])
    write_checkpoint(config_again.run_dir, 10, config_again)
    latest_again = str(config_again.run_dir / "checkpoints" / "latest")
    command = ["--config", TINY, "--checkpoint", latest_again, "--methods", "context,cvsi", *rerun]
    caplog.clear()
    caplog.set_level(logging.INFO, logger="training.evaluation.methods.cvsi")
    assert main([*command, f"cluster.storage_path={again}"]) == 0
    assert re.search(r", 0 captioner/LLM calls", caplog.text), caplog.text
    second = json.loads((config_again.run_dir / "eval" / "step_00000010.json").read_text())
    assert second["benchmarks"]["synthetic"]["baselines"]["cvsi"] == entry["baselines"]["cvsi"]


def test_methods_without_their_checkpoints_or_endpoint_end_in_one_error_line(tmp_path, world, capsys) -> None:
    overrides = _overrides(tmp_path, world)
    config = load_config(TINY, overrides)
    write_checkpoint(config.run_dir, 10, config)
    latest = str(config.run_dir / "checkpoints" / "latest")
    main = eval_main()
    assert main(["--config", TINY, "--checkpoint", latest, "--methods", "context,bogus", *overrides]) == 2
    assert "--methods has unknown ['bogus']" in capsys.readouterr().err
    unset = [*overrides, "methods.phi.checkpoint=null"]
    assert main(["--config", TINY, "--checkpoint", latest, "--methods", "phi", *unset]) == 2
    error = capsys.readouterr().err
    assert error.startswith("eval error:") and "methods.phi.checkpoint" in error and "Traceback" not in error
    msmp = load_config(
        REPO / "configs" / "tiscir_msmp_tiny.yaml",
        [f"cluster.storage_path={tmp_path / 'runs'}", "cluster.run_name=msmp", "model.weights_file=null"],
    )
    write_method_checkpoint(msmp.run_dir, 2, msmp)
    stage_one = [*overrides, f"methods.tiscir.checkpoint={msmp.run_dir / 'checkpoints' / 'latest'}"]
    assert main(["--config", TINY, "--checkpoint", latest, "--methods", "tiscir", *stage_one]) == 2
    error = capsys.readouterr().err.splitlines()[-1]
    assert error.startswith("eval error: tiscir:") and "msmp stage" in error
    dead = _overrides(tmp_path / "dead", world, endpoint="http://127.0.0.1:9/v1")
    assert main(["--config", TINY, "--checkpoint", latest, "--methods", "cvsi", *dead]) == 2
    error = capsys.readouterr().err.splitlines()[-1]  # after the progress bar
    assert error.startswith("eval error: cvsi") and "scene_oracle" in error


def test_released_searle_weights_score_on_the_configured_towers(tmp_path, world, capsys) -> None:
    from training.zeroshot.phi_net import Phi

    torch.manual_seed(3)
    released = tmp_path / "SEARLE_tiny.pt"
    phi = Phi(64, 96, 64)  # ContextTiny: 64-d embeddings, 64-wide text tower
    torch.save({"epoch": 3, "Phi": phi.state_dict()}, released)
    overrides = [
        *_overrides(tmp_path, world),
        "methods.phi.checkpoint=null",
        f"methods.phi.released_weights={released}",
    ]
    config = load_config(TINY, overrides)
    write_checkpoint(config.run_dir, 10, config)
    latest = str(config.run_dir / "checkpoints" / "latest")
    assert eval_main()(["--config", TINY, "--checkpoint", latest, "--methods", "context,phi", *overrides]) == 0
    result = json.loads((config.run_dir / "eval" / "step_00000010.json").read_text())
    assert "recall@1" in result["benchmarks"]["synthetic"]["baselines"]["phi"]
