"""Benchmarks and methods are plug-ins: one new file registers itself and the eval job scores it; the docs tables
and `launch/eval.py --list` come from the same registries."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from eval_fixtures import write_checkpoint, write_cirr_layout

from cluster.root_config import load_config
from training.config_loader import ConfigError
from training.evaluation.benchmarks import BENCHMARKS
from training.evaluation.catalog import benchmark_table, method_table
from training.evaluation.methods import METHODS

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY = str(REPO_ROOT / "configs" / "tiny.yaml")

TOY_PLUGIN = '''
"""A benchmark and a method that live outside the repository: one file, nothing else touched."""
from dataclasses import dataclass

from training.evaluation.benchmarks import Benchmark, DatasetSettings, Protocol, register_benchmark
from training.evaluation.benchmarks.cirr import read_cirr_layout
from training.evaluation.methods import Method, register_method

TOY_PROTOCOL = Protocol(recall_ks=(1, 2, 3), remove_reference=True)


@dataclass
class ToySettings(DatasetSettings):
    split: str = "val"


register_benchmark(
    Benchmark(
        name="toy",
        protocol=TOY_PROTOCOL,
        read=lambda settings, splits: [read_cirr_layout(settings.root, settings.split, "toy", TOY_PROTOCOL, True)],
        summary="a toy benchmark in CIRR layout",
        settings=ToySettings,
    )
)


class ReferenceTwice(Method):
    name = "reference_twice"
    summary = "the reference image's CLIP embedding, doubled"

    def gallery_space(self, model):
        return "clip_image"

    def encode_query(self, batch):
        return 2 * batch.views["img/reference"]

    def encode_gallery(self, batch):
        return batch.features.embedding


register_method(ReferenceTwice())
'''


@pytest.fixture
def toy_plugin(tmp_path):
    """Import the plug-in file from tmp_path (as a user's module would be), and forget it afterwards."""
    path = tmp_path / "toy_plugin.py"
    path.write_text(TOY_PLUGIN)
    spec = importlib.util.spec_from_file_location("toy_plugin", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    BENCHMARKS.unregister("toy")
    METHODS.unregister("reference_twice")
    sys.modules.pop("toy_plugin", None)


def _eval_main():
    spec = importlib.util.spec_from_file_location("launch_eval", REPO_ROOT / "launch" / "eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_unregistered_names_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="eval.benchmarks has unknown \\['toy'\\]"):
        load_config(TINY, ["eval.benchmarks=[toy]"])
    with pytest.raises(ConfigError, match="eval.baselines has unknown"):
        load_config(TINY, ["eval.baselines=[reference_twice]"])
    with pytest.raises(ConfigError, match="eval.datasets.toy"):
        load_config(TINY, ["eval.datasets.toy.root=/data"])


def test_a_plugin_benchmark_and_method_are_validated_and_scored(tmp_path, toy_plugin, capsys) -> None:
    write_cirr_layout(tmp_path / "toy", "val", "dev", sets=2)
    overrides = [
        f"cluster.storage_path={tmp_path / 'runs'}",
        "eval.benchmarks=[toy]",
        f"eval.datasets.toy.root={tmp_path / 'toy'}",
        "eval.baselines=[image_only,reference_twice]",
        "eval.select_metric=toy/recall@1",
        "eval.loader_workers=0",
        "eval.device=cpu",
    ]
    with pytest.raises(ConfigError, match="eval.datasets.toy.splitt"):
        load_config(TINY, [*overrides, "eval.datasets.toy.splitt=val"])  # the plug-in's own settings schema
    config = load_config(TINY, overrides)
    write_checkpoint(config.run_dir, 7, config)
    checkpoint = str(config.run_dir / "checkpoints" / "latest")
    assert _eval_main()(["--config", TINY, "--checkpoint", checkpoint, *overrides]) == 0

    result = json.loads((config.run_dir / "eval" / "step_00000007.json").read_text())
    entry = result["benchmarks"]["toy"]
    assert set(entry["metrics"]) == {"recall@1", "recall@2", "recall@3"}
    assert set(entry["baselines"]) == {"image_only", "reference_twice"}
    # The doubled reference ranks exactly like the reference itself: both are normalised before ranking.
    assert entry["baselines"]["reference_twice"] == entry["baselines"]["image_only"]
    assert json.loads((config.run_dir / "eval" / "best.json").read_text())["metric"] == "toy/recall@1"
    assert "reference_twice" in capsys.readouterr().out


def test_docs_tables_are_the_registries() -> None:
    page = (REPO_ROOT / "docs" / "evaluation.md").read_text()
    assert benchmark_table() in page, (
        "docs/evaluation.md's benchmark table drifted: paste `python launch/eval.py --list`"
    )
    assert method_table() in page, "docs/evaluation.md's method table drifted: paste `python launch/eval.py --list`"
    for name in ("cirr", "circo", "fashioniq", "patterncir", "synthetic"):
        assert f"| `{name}` |" in benchmark_table()
    for name in ("context", "image_only", "text_only", "image_text_sum"):
        assert f"| `{name}` |" in method_table()


def test_eval_list_prints_both_tables(capsys) -> None:
    assert _eval_main()(["--list"]) == 0
    assert capsys.readouterr().out.strip() == f"{benchmark_table()}\n\n{method_table()}"
