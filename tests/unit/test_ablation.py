"""The Text-CC ablation sweep's bookkeeping: its cells, their config overrides, resumable results and the table.

The sweep itself trains and evaluates real runs (`launch/ablate_cc.py`); each of those parts has its own tests.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from cluster.bench.ablation import RESULTS, Cell, append_result, cells, mean_std, read_results, table
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
    rows = table(done).splitlines()
    assert rows[0].startswith("| towers | lambda | seeds | R@1 % |")
    assert rows[2].startswith("| pretrained | 0 | 1 | 30.0 ± nan |") and "n/a" in rows[2]
    assert rows[3].startswith("| pretrained | 0.08 | 3 | 42.0 ± 2.0 |") and "| 60.0 ± 10.0 |" in rows[3]
    mean, std = mean_std([1.0])
    assert mean == 1.0 and math.isnan(std)
