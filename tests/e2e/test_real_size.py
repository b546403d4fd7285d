"""The real-size path on CPU: the full ViT-B-32 architecture (random init, 224 px) from shards of the synthetic
benchmark built at image_short_side=256, on 2 gloo ranks under ZeRO-1, ZeRO-2 and ZeRO-3.

Each stage trains a step, skips a step whose batch holds a NaN on one rank (parameters, their partitions and the
Adam moments untouched on both ranks), checkpoints, trains one more step, and a fresh pair of ranks resumes from
the checkpoint to the same loss, bit for bit. The ZeRO-3 checkpoint (its weights gathered into
`model.safetensors`) is then scored by `launch/eval.py`. Each rank's peak host memory is reported.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import resource
import time
from pathlib import Path

import pytest
import torch
from dist_harness import run_ranks
from figures import FIGURES
from poisoned_batches import with_nan_pixels

from cluster.root_config import load_config
from training.checkpoint import layout

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY = REPO_ROOT / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory) -> Path:
    """A small synthetic benchmark and its shards at image_short_side=256 for ViT-B-32's tokenizer."""
    from shards.builder.shard_set import build_shards
    from shards.synthetic import generate

    root = tmp_path_factory.mktemp("real_size")
    generate(root / "synthetic", seed=0, n_train=24, n_val=6, n_test=0)
    config = load_config(TINY, _overrides(root, stage=1))
    build_shards(config.data, config.model.backbone, progress=False)
    return root


def _overrides(root: Path, stage: int) -> list[str]:
    return [
        "model.backbone=ViT-B-32",
        "model.fusion_layers=4",
        "model.fusion_heads=8",
        f"data.sources.0.path={root / 'synthetic'}",
        f"data.sources.0.trees={root / 'synthetic' / 'trees.jsonl'}",
        f"data.shards_dir={root / 'shards'}",
        "data.samples_per_shard=8",
        "data.image_short_side=256",
        "data.loader_workers=0",
        "data.shuffle_buffer=8",
        "train.micro_batch=2",
        "train.global_batch=4",
        "cluster.num_workers=2",
        f"cluster.storage_path={root / 'runs'}",
        f"cluster.run_name=zero{stage}",
        f"deepspeed.zero_stage={stage}",
        "optim.lr=1e-4",
        "optim.warmup_steps=1",
        f"eval.datasets.synthetic.root={root / 'synthetic'}",
        "eval.device=cpu",
        "eval.batch_size=8",
    ]


def _snapshot(engine) -> dict[str, torch.Tensor]:
    """This rank's parameters (its ZeRO-3 partitions) and the Adam moments it holds."""
    state = {name: getattr(p, "ds_tensor", p).detach().clone() for name, p in engine.module.named_parameters()}
    for index, slots in enumerate(engine.basic_optimizer.state.values()):
        state |= {f"adam/{index}/{key}": torch.as_tensor(value).clone() for key, value in slots.items()}
    return state


def _same(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> bool:
    return first.keys() == second.keys() and all(torch.equal(first[name], second[name]) for name in first)


def _stage_ranks(rank: int, world: int, overrides: list[str]) -> dict:
    from shards.stream.reader import build_reader
    from training.engine.deepspeed_engine import build_engine, deepspeed_config
    from training.objectives.context_cir import ConTextObjective
    from training.trainer.loop import train_step
    from training.trainer.state import TrainState
    from training.trainer.worker import build_checkpointer, seed_everything

    config = load_config(TINY, overrides)
    cpu = torch.device("cpu")
    started = time.perf_counter()

    def build():
        seed_everything(0)
        objective = ConTextObjective(config.model, config.loss)
        engine, _, _ = build_engine(objective, config.optim, deepspeed_config(config.deepspeed, config.batch, False))
        reader = build_reader(config.data, config.model.backbone, config.train.micro_batch, rank, world)
        seed_everything(1 + rank)
        state = TrainState()
        return engine, reader, state, build_checkpointer(config, engine, objective.model, reader, state)

    engine, reader, state, checkpointer = build()
    batches = iter(reader)
    first = train_step(engine, [next(batches)], cpu)
    before = _snapshot(engine)
    poisoned = next(batches)
    if rank == 1:
        poisoned = with_nan_pixels(poisoned, config.model.backbone)
    skipped = train_step(engine, [poisoned], cpu)
    untouched = _same(before, _snapshot(engine))
    state.step, state.samples_seen, state.skipped_steps = 2, 8, 1
    checkpointer.save(2)
    third = train_step(engine, [next(batches)], cpu)
    reader.close()
    trained_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    del engine, checkpointer
    gc.collect()

    engine, reader, state, checkpointer = build()  # fresh ranks: new weights, reader at the start
    checkpointer.load(layout.checkpoint_dir(config.run_dir, 2))
    resumed = train_step(engine, [next(iter(reader))], cpu)
    reader.close()
    return {
        "losses": [first.metrics["loss"], skipped.metrics["loss"], third.metrics["loss"], resumed.metrics["loss"]],
        "skipped": [first.skipped, skipped.skipped, third.skipped, resumed.skipped],
        "untouched": untouched,
        "state": [state.step, state.skipped_steps],
        "peak_rss_gb": trained_peak,  # training and checkpointing (the resume below builds a second engine)
        "seconds": time.perf_counter() - started,
    }


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_vit_b_32_trains_skips_checkpoints_and_resumes_under_zero(benchmark, stage) -> None:
    results = run_ranks(_stage_ranks, 2, (_overrides(benchmark, stage),))
    for rank, result in enumerate(results):
        first, skipped, third, resumed = result["losses"]
        assert result["skipped"] == [False, True, False, False], rank
        assert result["untouched"], f"rank {rank}: the skipped step changed parameters or Adam moments"
        assert first == first and skipped != skipped  # finite, then the NaN every rank saw through the vote
        assert resumed == third, f"rank {rank}: resumed loss {resumed} != uninterrupted {third}"
        assert result["state"] == [2, 1]
    run_dir = load_config(TINY, _overrides(benchmark, stage)).run_dir
    assert layout.latest_complete(run_dir)[0] == 2
    memory = ", ".join(f"{result['peak_rss_gb']:.2f} GB" for result in results)
    seconds = max(result["seconds"] for result in results)
    FIGURES.append(
        f"ViT-B-32 ZeRO-{stage}, 2 gloo ranks: peak host memory per rank {memory}; "
        f"{seconds:.0f} s for 4 steps, a checkpoint and a resume"
    )


def test_the_zero_3_checkpoint_is_scored_by_the_eval_job(benchmark) -> None:
    overrides = _overrides(benchmark, stage=3)
    run_dir = load_config(TINY, overrides).run_dir
    if layout.latest_complete(run_dir) is None:
        pytest.skip("needs the ZeRO-3 run of this module")
    spec = importlib.util.spec_from_file_location("launch_eval", REPO_ROOT / "launch" / "eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    checkpoint = str(run_dir / "checkpoints" / "latest")
    assert module.main(["--config", str(TINY), "--checkpoint", checkpoint, *overrides]) == 0
    result = json.loads((run_dir / "eval" / "step_00000002.json").read_text())
    metrics = result["benchmarks"]["synthetic"]["metrics"]
    assert {"recall@1", "recall_subset@1", "grounding"} <= set(metrics)
    assert result["checkpoint_config"]["model"]["backbone"] == "ViT-B-32"
