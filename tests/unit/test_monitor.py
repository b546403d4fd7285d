"""What a watcher sees (no processes): TensorBoard scalars, the NP attention-map grid, metrics.jsonl."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from shard_fixtures import write_shard_set
from tiny_config import TINY, tiny_overrides

from cluster.root_config import load_config
from training.monitor.run_monitor import read_metrics
from training.trainer.loop import StepResult
from training.trainer.state import TrainState
from training.trainer.worker import build_monitor


def _first_batch(config):
    from shards.stream.reader import build_reader

    reader = build_reader(config.data, config.model.backbone, config.train.micro_batch, 0, 1)
    batch = next(iter(reader))
    reader.close()
    return batch


def test_monitor_logs_scalars_metrics_and_attention_grid(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from training.model.context_cir import build_model

    write_shard_set(tmp_path / "shards", [8])
    overrides = tiny_overrides(tmp_path, tmp_path / "shards", **{"cluster.num_workers": 1, "train.global_batch": 4})
    config = load_config(TINY, [*overrides, "logging.image_every=2", "logging.num_images=3"])
    torch.manual_seed(0)
    model = build_model(config.model)
    batch = _first_batch(config)
    metrics = {"loss": 2.5, "contrastive_loss": 2.4, "cc_loss": 0.1, "cc/raw": 1.25}
    monitor = build_monitor(config, 0, 0, model, "cpu")
    for step in (1, 2):
        state = TrainState(step=step, samples_seen=4 * step, skipped_steps=step - 1)
        result = StepResult(dict(metrics, loss=float("nan") if step == 2 else 2.5), 1e-3, 0.5, step == 2, "abc")
        monitor.log_step(state, result, step_time=0.5, data_wait=0.1, batches=[batch])
    monitor.close()

    events = EventAccumulator(str(tmp_path / "runs" / "test" / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {
        "train/loss",
        "train/cc_loss",
        "cc/raw",
        "train/lr",
        "perf/triplets_per_s",
        "perf/data_wait_frac",
    } <= scalars
    assert [e.value for e in events.Scalars("train/skipped_steps")] == [0, 1]
    assert [e.step for e in events.Scalars("train/loss")] == [1]  # a non-finite loss is not plotted
    assert math.isclose(events.Scalars("perf/triplets_per_s")[0].value, 8.0)
    (image,) = events.Images("attention/np_maps")
    assert image.step == 2
    # 3 rows (samples) x (reference + 2 noun phrases) tiles of 128 px plus captions and padding
    assert (image.width, image.height) == (3 * 132 + 4, 3 * 146 + 4)

    logged = read_metrics(tmp_path / "runs" / "test")
    assert logged[1]["loss"] == 2.5 and logged[2]["loss"] is None and logged[2]["skipped"] is True
    assert logged[2]["skipped_steps"] == 1 and logged[2]["digest"] == "abc" and logged[2]["lr"] == 1e-3
    # The data wait beside the step time: a reader of the file can tell a loader-bound run.
    assert logged[1]["step_time_s"] == 0.5 and logged[1]["data_wait_s"] == 0.1


def test_attention_grid_draws_each_phrase_map_over_its_image():
    from training.monitor.attention_images import TILE, attention_grid

    images = torch.zeros(2, 3, 16, 16)
    maps = torch.zeros(2, 3, 2, 2)
    maps[0, 0, 0, 0] = 1.0  # first phrase of sample 0 looks at the top-left patch
    maps[0, 1, 1, 1] = 1.0  # its second phrase at the bottom-right one
    mask = torch.tensor([[True, True, False], [True, False, False]])
    grid = np.asarray(attention_grid(images, maps, mask, [["a cat", "a hat"], ["a dog"]], "ContextTiny"))
    cell = TILE + 4
    first = grid[4 : 4 + TILE, 4 + cell : 4 + cell + TILE].astype(int).sum(axis=2)
    second = grid[4 : 4 + TILE, 4 + 2 * cell : 4 + 2 * cell + TILE].astype(int).sum(axis=2)
    assert first[:8, :8].mean() > first[-8:, -8:].mean()  # hot where the phrase attends
    assert second[-8:, -8:].mean() > second[:8, :8].mean()
    assert grid.shape == (2 * (TILE + 18) + 4, 3 * cell + 4, 3)


def test_attention_tiles_show_the_same_picture_for_pixels_and_normalised_images():
    """The reader hands the monitor uint8 pixels; a caller with normalised images gets the same tiles."""
    from shards.model_inputs import normalisation, normalise_images
    from training.monitor.attention_images import denormalise

    pixels = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    from_pixels = denormalise(pixels, "ContextTiny").astype(int)
    from_floats = denormalise(normalise_images(pixels, *normalisation("ContextTiny")), "ContextTiny").astype(int)
    assert np.abs(from_pixels - from_floats).max() <= 1  # float rounding at most
    assert from_pixels.std() > 30  # the noise survives: not a blank or saturated tile


def _counted_flops(objective, batch) -> float:
    """FLOPs torch's counter sees in one forward + backward, CPU flash attention included."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten
    cpu_attention = {
        aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *a, out_shape=None, **kw: sdpa_flop_count(
            q, k, v
        ),
        aten._scaled_dot_product_flash_attention_for_cpu_backward: lambda g, q, k, v, *a, out_shape=None, **kw: (
            sdpa_backward_flop_count(g, q, k, v)
        ),
    }
    with FlopCounterMode(display=False, custom_mapping=cpu_attention) as counter:
        outputs = objective(batch)
        sum(value for name, value in outputs.items() if name.endswith("_loss")).backward()
    return float(counter.get_total_flops())


@pytest.mark.parametrize("nps,lambda_cc", [(3, 0.08), (10, 0.08), (3, 0.0)])
def test_analytic_step_flops_match_the_counted_ones_without_recompute(nps, lambda_cc) -> None:
    from shards.model_inputs import image_size
    from training.monitor.mfu import StepShape, step_flops
    from training.objectives.context_cir import ConTextObjective
    from training.perf.step import synthetic_batch

    config = load_config(TINY, [f"loss.lambda_cc={lambda_cc}"])
    torch.manual_seed(0)
    objective = ConTextObjective(config.model, config.loss)
    batch = synthetic_batch(8, nps, 10, 16, image_size("ContextTiny"), torch.device("cpu"))
    analytic = step_flops(objective.model, StepShape.of(batch), text_cc=lambda_cc > 0)
    counted = _counted_flops(objective, batch)
    assert abs(analytic / counted - 1) < 0.05, (analytic, counted)
    # Activation checkpointing recomputes the towers' forward: more work done, the same model FLOPs.
    objective.model.backbone.set_grad_checkpointing(True)
    assert _counted_flops(objective, batch) > 1.1 * counted
    assert step_flops(objective.model, StepShape.of(batch), text_cc=lambda_cc > 0) == analytic


def test_device_peaks_tell_sxm_from_pcie_and_take_an_override() -> None:
    from training.monitor.mfu import peak_bf16_flops

    assert peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_bf16_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_bf16_flops("NVIDIA H200") == 989e12
    assert peak_bf16_flops("NVIDIA A100-SXM4-80GB") == peak_bf16_flops("NVIDIA A100 80GB PCIe") == 312e12
    assert peak_bf16_flops("NVIDIA L40S") == 362e12 and peak_bf16_flops("NVIDIA L4") == 121e12
    assert peak_bf16_flops("NVIDIA A10G") is None and peak_bf16_flops("Some Future GPU") is None
    assert peak_bf16_flops("NVIDIA H100 PCIe", override_tflops=500) == 500e12


def test_a_restarted_attempt_leaves_one_record_per_step(tmp_path):
    """Steps a crashed attempt logged after the checkpoint are dropped before the new attempt logs them again."""
    import json

    from training.model.context_cir import build_model
    from training.monitor.run_monitor import METRICS_FILE

    write_shard_set(tmp_path / "shards", [8])
    overrides = tiny_overrides(tmp_path, tmp_path / "shards", **{"cluster.num_workers": 1, "train.global_batch": 4})
    config = load_config(TINY, [*overrides, "logging.image_every=1000"])
    model = build_model(config.model)

    def attempt(start: int, stop: int, loss: float) -> None:
        monitor = build_monitor(config, 0, start, model, "cpu")
        for step in range(start + 1, stop + 1):
            state = TrainState(step=step, samples_seen=4 * step)
            monitor.log_step(state, StepResult({"loss": loss}, 1e-3, 0.5, False, "d"), 0.5, 0.1, batches=[{}])
        monitor.close()

    attempt(0, 5, loss=1.0)  # crashed after step 5; its latest checkpoint was step 3
    path = tmp_path / "runs" / "test" / METRICS_FILE
    with path.open("a") as torn:
        torn.write('{"step": 6, "lo')  # killed mid-write
    attempt(3, 6, loss=2.0)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    steps = [record["step"] for record in records if "step" in record]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert [record["loss"] for record in records if "step" in record] == [1.0, 1.0, 1.0, 2.0, 2.0, 2.0]
    assert [record.get("from_step") for record in records if record.get("event") == "start"] == [0, 3]


def _train_on_damaged_shards(rank: int, world_size: int, overrides: list[str]) -> dict:
    from training.trainer.worker import train_worker

    train_worker(load_config(TINY, overrides))
    return read_metrics(load_config(TINY, overrides).run_dir) if rank == 0 else {}


def test_reader_problem_counts_are_step_metrics(tmp_path):
    """A corrupt image in the shards: `data/corrupt_samples` in metrics.jsonl, summed over the ranks."""
    from dist_harness import run_ranks
    from shard_fixtures import replace_member, shard_name

    from shards.stream.decode import DATA_PROBLEMS

    write_shard_set(tmp_path / "shards", [12, 12])
    replace_member(tmp_path / "shards" / shard_name(1), "s01_005.ref.jpg", b"\xff\xd8\xff\xe0 not a jpeg")
    overrides = tiny_overrides(tmp_path, tmp_path / "shards", **{"train.steps": 3, "checkpoint.every_steps": 3})
    logged = run_ranks(_train_on_damaged_shards, 2, (overrides,))[0]
    last = logged[str(max(int(step) for step in logged))]  # keys came back through JSON
    assert {f"data/{kind}" for kind in DATA_PROBLEMS} <= last.keys()
    # 3 steps x 16 triplets = 2 epochs of the 24 samples: the corrupt one was met once in each
    assert last["data/corrupt_samples"] == 2 and last["data/truncated_shards"] == 0
