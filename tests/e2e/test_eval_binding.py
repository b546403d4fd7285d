"""`launch/eval.py` on a generated synthetic benchmark with its `binding` split: the binding metrics beside the full
split's, for the model and every baseline, in the JSON, the printed table and TensorBoard."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from eval_fixtures import eval_main, write_checkpoint

from cluster.root_config import load_config
from shards.synthetic import generate

TINY = str(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml")
CIRR_KEYS = {"recall@1", "recall@5", "recall@10", "recall@50", "recall_subset@1", "recall_subset@2", "recall_subset@3"}
CIRR_KEYS |= {"avg"}
BINDING_QUERIES = 12
BINDING_KEYS = {f"binding/{key}" for key in CIRR_KEYS} | {"binding/target_above_hard_negative"}


def test_eval_reports_the_binding_split_beside_the_full_split(tmp_path, capsys) -> None:
    root = tmp_path / "synthetic"
    generate(root, seed=1, n_train=5, n_val=10, n_test=0, n_binding=BINDING_QUERIES)
    overrides = [
        f"cluster.storage_path={tmp_path / 'runs'}",
        f"eval.datasets.synthetic.root={root}",
        "eval.device=cpu",
        "eval.batch_size=32",
    ]
    config = load_config(TINY, overrides)
    write_checkpoint(config.run_dir, 10, config)
    latest = str(config.run_dir / "checkpoints" / "latest")
    assert eval_main()(["--config", TINY, "--checkpoint", latest, "--benchmarks", "synthetic", *overrides]) == 0

    entry = json.loads((config.run_dir / "eval" / "step_00000010.json").read_text())["benchmarks"]["synthetic"]
    assert BINDING_KEYS | CIRR_KEYS <= set(entry["metrics"])
    assert not any(key.startswith("binding/grounding") for key in entry["metrics"])  # grounding stays val's alone
    assert all(BINDING_KEYS <= set(metrics) for metrics in entry["baselines"].values())
    # The reference alone scores an edit of A and its mirror, the same edit of B, once for each of the two queries
    # that ask for them: exactly one of the pair wins, whatever the weights.
    assert entry["baselines"]["image_only"]["binding/target_above_hard_negative"] == pytest.approx(0.5)
    for metrics in (entry["metrics"], *entry["baselines"].values()):
        assert all(0.0 <= metrics[key] <= 1.0 for key in BINDING_KEYS)
    assert entry["diagnostics"]["binding"]["queries"] == BINDING_QUERIES and entry["version"]["queries"] == 10

    # The binding metrics are the binding queries' own: recall@1 agrees with their predictions, not with val's.
    captions = json.loads((root / "cirr" / "captions" / "cap.rc2.binding.json").read_text())
    predictions = entry["predictions"]
    hits = [predictions[f"binding/{c['pairid']}"][0] == c["target_hard"] for c in captions]
    assert entry["metrics"]["binding/recall@1"] == pytest.approx(sum(hits) / len(hits))
    assert len([key for key in predictions if key.startswith("binding/")]) == BINDING_QUERIES
    assert len([key for key in predictions if not key.startswith("binding/")]) == 10

    printed = capsys.readouterr().out
    assert f"binding: {BINDING_QUERIES} queries, gallery 18" in printed and "binding/recall_subset@1" in printed

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(config.run_dir / "tensorboard"))
    events.Reload()
    assert {"eval/synthetic/binding/recall@1", "eval/synthetic/image_only/binding/recall@1"} <= set(
        events.Tags()["scalars"]
    )
