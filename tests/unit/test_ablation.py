"""The Text-CC ablation sweep's bookkeeping: its cells, their config overrides, resumable results and the table.

The sweep itself trains and evaluates real runs (`launch/ablate_cc.py`); each of those parts has its own tests.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from cluster.bench.ablation import (
    RESULTS,
    VARIANTS,
    Cell,
    append_result,
    cells,
    logged_figures,
    logged_table,
    mean_std,
    read_results,
    replace_result,
    table,
    variant_cells,
)
from cluster.root_config import load_config

REPO = Path(__file__).resolve().parents[2]


def test_cells_cover_the_grid_and_their_overrides_load() -> None:
    sweep = list(cells(["random", "pretrained"], [0, 0.08], [0, 1, 2]))
    assert len(sweep) == 12 and len({cell.run_name for cell in sweep}) == 12
    pretrained = Cell("pretrained", 0.08, 2)
    config = load_config(REPO / "configs" / "tiny.yaml", pretrained.overrides(40, "towers.safetensors"))
    assert (config.loss.lambda_cc, config.train.seed, config.train.steps) == (0.08, 2, 40)
    assert config.model.weights_file == "towers.safetensors" and config.optim.restart_every == 40
    assert config.cluster.run_name == "ablation-pretrained-lambda0.08-seed2"
    random_cell = load_config(REPO / "configs" / "tiny.yaml", Cell("random", 0.0, 0).overrides(40, None))
    assert random_cell.model.weights_file is None
    with pytest.raises(ValueError, match="towers"):
        pretrained.overrides(40, None)
    with pytest.raises(ValueError, match="unknown init"):
        list(cells(["imagenet"], [0], [0]))


def test_results_resume_and_the_table_reports_mean_and_sample_std(tmp_path: Path) -> None:
    path = tmp_path / RESULTS
    for seed, (recall, pointing) in enumerate([(0.40, 0.5), (0.42, 0.6), (0.44, 0.7)]):
        metrics = {"recall@1": recall, "grounding/context/present/pointing": pointing}
        append_result(path, Cell("pretrained", 0.08, seed), 500, metrics)
    append_result(path, Cell("pretrained", 0.0, 0), 500, {"recall@1": 0.30})
    done = read_results(path)
    assert set(done) == {f"ablation-pretrained-lambda0.08-seed{s}" for s in range(3)} | {
        "ablation-pretrained-lambda0-seed0"
    }
    retrieval, grounding, paired = (part.splitlines() for part in table(done).split("\n\n"))
    assert retrieval[0].startswith("| towers | cell | seeds | R@1 % | R@5 % |")
    assert retrieval[2].startswith("| pretrained | lambda 0 | 1 | 30.0 ± nan | n/a |")
    assert retrieval[3].startswith("| pretrained | lambda 0.08 | 3 | 42.0 ± 2.0 |")
    assert grounding[3].startswith("| pretrained | lambda 0.08 | 3 | 60.0 ± 10.0 / n/a |")
    # One pair (seed 0): 40.0 - 30.0 points, no spread from one pair.
    assert paired[2].startswith("| pretrained | lambda 0.08 | 1 | 10.0 ± nan |")
    mean, std = mean_std([1.0])
    assert mean == 1.0 and math.isnan(std)


def test_variant_cells_load_and_pair_against_lambda_zero(tmp_path: Path) -> None:
    sweep = list(variant_cells(["pretrained"], list(VARIANTS), [0, 1]))
    assert len(sweep) == 2 * len(VARIANTS) and len({cell.run_name for cell in sweep}) == len(sweep)
    for cell in sweep:
        config = load_config(REPO / "configs" / "tiny.yaml", cell.overrides(40, "towers.safetensors"))
        assert config.loss.lambda_cc == cell.lambda_cc and config.cluster.run_name == cell.run_name
    keep = next(cell for cell in sweep if cell.variant == "towers-spatial-keep")
    loss = load_config(REPO / "configs" / "tiny.yaml", keep.overrides(40, "towers.safetensors")).loss
    assert (loss.cc_target, loss.cc_form, loss.lambda_grounding) == ("towers", "spatial", 1.0)
    assert keep.run_name == "ablation-pretrained-towers-spatial-keep-seed0"
    with pytest.raises(ValueError, match="unknown variant"):
        list(variant_cells(["pretrained"], ["towers-kl"], [0]))

    path = tmp_path / RESULTS
    for cell, recall in zip(sweep, [0.30, 0.34, 0.50, 0.40]):  # lambda0 seeds 0 and 1, then paper seeds 0 and 1
        append_result(path, cell, 40, {"recall@1": recall, "binding/recall_subset@1": recall / 2})
    paired = table(read_results(path)).split("\n\n")[2].splitlines()
    assert paired[2].startswith("| pretrained | paper | 2 | 13.0 ± 9.9 | 6.5 ± 4.9 |")
    assert read_results(path)["ablation-pretrained-paper-seed0"]["variant"] == "paper"
    replace_result(path, sweep[0], {"recall@1": 0.50})
    assert read_results(path)[sweep[0].run_name]["metrics"] == {"recall@1": 0.50}
    assert len(read_results(path)) == 4


def test_logged_table_averages_the_first_and_last_steps(tmp_path: Path) -> None:
    cell = Cell("pretrained", 1.0, 0, "towers-spatial")
    run = tmp_path / cell.run_name
    run.mkdir()
    lines = [{"step": step, "contrastive_loss": 5.0 - step / 100, "cc/raw": float(step)} for step in range(1, 301)]
    lines.insert(3, {"step": 3, "eval": True})  # lines without the training figures are skipped
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    append_result(tmp_path / RESULTS, cell, 300, {"recall@1": 0.3})
    figures = logged_figures(run / "metrics.jsonl")
    assert figures["cc/raw"] == (25.5, 250.5) and "grounding/raw" not in figures
    rows = logged_table(read_results(tmp_path / RESULTS), tmp_path).splitlines()
    assert rows[2] == "| pretrained | towers-spatial | 1 | 4.75 → 2.5 | 25.5 → 250 | n/a | n/a | n/a |"
