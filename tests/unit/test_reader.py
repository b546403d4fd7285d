"""Streaming reader: exact resume with loader workers, equal steps per rank, seeded order, damaged shards."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from contextlib import closing
from pathlib import Path

import pytest
import torch
from shard_fixtures import insert_member, replace_member, shard_keys, truncate, write_shard_set

from shards.format import ShardIndex, shard_name
from shards.stream.plan import StreamPlan
from shards.stream.reader import ShardStream

SIZES = [5, 23, 9, 17, 12, 7, 20]
BATCH = 4
WORLD = 2
WORKERS = 2
BUFFER = 8  # smaller than a slot's share, so resumes land in the streaming and in the draining phase


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("shards")
    write_shard_set(directory, SIZES)
    return directory


@pytest.fixture(scope="module")
def damaged_set(tmp_path_factory) -> Path:
    """A truncated shard, a corrupt image, a corrupt token array and members with unsafe names."""
    directory = tmp_path_factory.mktemp("damaged")
    write_shard_set(directory, [6, 14, 9, 11, 8, 13, 10])
    truncate(directory / shard_name(1), 0.5)
    replace_member(directory / shard_name(3), "s03_002.ref.jpg", b"\xff\xd8\xff\xe0 not really a jpeg")
    replace_member(directory / shard_name(5), "s05_004.cap.npy", b"\x93NUMPY garbage")
    insert_member(directory / shard_name(2), "s02_001.txt", "../escape.txt", b"outside")
    insert_member(directory / shard_name(2), "s02_003.json", "s02_003.exe", b"unknown field")
    return directory


def make_stream(directory: Path, rank: int = 0, **overrides) -> ShardStream:
    arguments = dict(
        backbone="ContextTiny",
        batch_size=BATCH,
        rank=rank,
        world_size=WORLD,
        num_workers=WORKERS,
        seed=7,
        shuffle_buffer=BUFFER,
    )
    arguments.update(overrides)
    return ShardStream(directory, **arguments)


def take(stream: ShardStream, steps: int) -> list[list[str]]:
    """Keys of the next `steps` batches; the loader workers are stopped afterwards."""
    with closing(iter(stream)) as batches:
        return [next(batches)["keys"] for _ in range(steps)]


def take_with_states(stream: ShardStream, steps: int) -> tuple[list[list[str]], list[dict]]:
    """Keys of the next `steps` batches and, for each step k, the state (JSON round trip) after k batches."""
    states = [json.loads(json.dumps(stream.state_dict()))]
    keys = []
    with closing(iter(stream)) as batches:
        for _ in range(steps):
            keys.append(next(batches)["keys"])  # the loader workers run ahead; the state must not
            states.append(json.loads(json.dumps(stream.state_dict())))
    return keys, states


def resume(directory: Path, rank: int, state: dict, steps: int, **overrides) -> tuple[list[list[str]], dict]:
    """Keys of `steps` batches from a fresh reader that loaded `state`, and its counts afterwards."""
    stream = make_stream(directory, rank, **overrides)
    stream.load_state_dict(state)
    return take(stream, steps), stream.stats


@pytest.mark.parametrize("world_size,slots,batch", [(2, 2, 4), (3, 4, 2), (1, 5, 3), (4, 1, 7)])
def test_plan_gives_every_rank_the_same_steps_from_disjoint_samples(world_size, slots, batch):
    plan = StreamPlan(tuple(f"s{i}" for i in range(len(SIZES))), tuple(SIZES), 5, world_size, slots, batch)
    assert plan.steps_per_epoch == sum(SIZES) // (world_size * batch)
    assert sum(plan.slot_batches(slot) for slot in range(slots)) == plan.steps_per_epoch
    for epoch in range(3):
        order = plan.shard_order(epoch)
        sequence = [(f"s{i}", n) for i in order for n in range(SIZES[i])]
        taken = [
            (piece.shard, n)
            for rank in range(world_size)
            for slot in range(slots)
            for piece in plan.slot_pieces(epoch, rank, slot)
            for n in range(piece.first, piece.stop)
        ]
        assert taken == sequence[: plan.used_samples]  # contiguous shares, nothing twice, only the tail dropped
        refill = [
            (p.shard, n) for p in plan.refill_pieces(epoch, world_size - 1, slots - 1) for n in range(p.first, p.stop)
        ]
        assert sorted(refill) == sorted(sequence)
    assert len({tuple(plan.shard_order(epoch)) for epoch in range(3)}) > 1


@pytest.mark.timeout(120)
def test_resume_mid_epoch_and_across_epochs_continues_the_same_sequence(shard_set):
    steps = make_stream(shard_set).steps_per_epoch
    assert steps == sum(SIZES) // (WORLD * BATCH)
    uninterrupted = {}
    for rank in range(WORLD):
        stream = make_stream(shard_set, rank)
        assert stream.steps_per_epoch == steps
        uninterrupted[rank], states = take_with_states(stream, 2 * steps)
        for stop in (5, steps - 1, steps, steps + 3):
            keys, _ = resume(shard_set, rank, states[stop], 2 * steps - stop)
            assert keys == uninterrupted[rank][stop:], f"rank {rank} resumed at step {stop} diverged"

    for epoch in range(2):
        epoch_keys = [
            key
            for rank in range(WORLD)
            for batch in uninterrupted[rank][epoch * steps : (epoch + 1) * steps]
            for key in batch
        ]
        assert all(len(batch) == BATCH for rank in range(WORLD) for batch in uninterrupted[rank])
        assert len(epoch_keys) == len(set(epoch_keys)) == WORLD * steps * BATCH  # nothing twice, nothing lost
        every_key = {key for shard, count in enumerate(SIZES) for key in shard_keys(shard, count)}
        assert set(epoch_keys) <= every_key
    assert uninterrupted[0][:steps] != uninterrupted[0][steps:]


@pytest.mark.timeout(60)
def test_order_is_a_function_of_seed_and_epoch(shard_set):
    def two_epochs(seed: int) -> list[list[str]]:
        stream = make_stream(shard_set, world_size=1, num_workers=0, seed=seed)
        return take(stream, 2 * stream.steps_per_epoch)

    first, again, other_seed = two_epochs(3), two_epochs(3), two_epochs(4)
    half = len(first) // 2
    assert first == again
    assert first[:half] != first[half:]
    assert sorted(sum(first[:half], [])) != sum(first[:half], []), "samples within an epoch are not shuffled"
    assert first != other_seed


@pytest.mark.timeout(120)
def test_damaged_shards_are_skipped_counted_and_every_rank_still_fills_its_steps(damaged_set):
    steps = make_stream(damaged_set).steps_per_epoch
    totals: Counter[str] = Counter()
    for rank in range(WORLD):
        stream = make_stream(damaged_set, rank)
        keys = take(stream, 2 * steps)
        assert len(keys) == 2 * steps and all(len(batch) == BATCH for batch in keys)
        seen = {key for batch in keys for key in batch}
        assert not seen & {"s03_002", "s05_004"}, "a corrupt sample reached a batch"
        totals.update(stream.stats)
    assert totals["truncated_shards"] >= 1
    assert totals["corrupt_samples"] >= 2 * 2  # both corrupt samples, in each of the two epochs
    assert totals["unsafe_members"] >= 2
    assert totals["refilled_samples"] >= 1  # the slot that lost half a shard topped up its batches


@pytest.mark.timeout(120)
def test_resume_is_exact_on_damaged_shards_including_top_ups_and_counts(damaged_set):
    # Every resume point, in-process for speed; a buffer larger than a share exercises the drain-only path.
    for rank, buffer in ((0, BUFFER), (1, BUFFER), (0, 1000)):
        stream = make_stream(damaged_set, rank, num_workers=0, shuffle_buffer=buffer)
        total = 2 * stream.steps_per_epoch
        uninterrupted, states = take_with_states(stream, total)
        for stop in range(1, total):
            keys, stats = resume(damaged_set, rank, states[stop], total - stop, num_workers=0, shuffle_buffer=buffer)
            assert keys == uninterrupted[stop:], f"rank {rank} buffer {buffer} resumed at step {stop} diverged"
            assert stats == stream.stats, f"rank {rank} buffer {buffer} resumed at step {stop} miscounted"
    # And once with loader workers, resuming just before the epoch boundary.
    uninterrupted, states = take_with_states(make_stream(damaged_set, 1), total)
    keys, _ = resume(damaged_set, 1, states[total // 2 - 2], total - total // 2 + 2)
    assert keys == uninterrupted[total // 2 - 2 :]


@pytest.mark.timeout(60)
def test_a_shard_set_with_nothing_decodable_fails_clearly_instead_of_looping(tmp_path):
    write_shard_set(tmp_path, [4])
    for key in shard_keys(0, 4):
        replace_member(tmp_path / shard_name(0), f"{key}.tgt.jpg", b"not an image")
    stream = make_stream(tmp_path, world_size=1, num_workers=0, batch_size=2)
    with pytest.raises(RuntimeError, match="no decodable sample"):
        take(stream, 1)
    assert stream.step == 0


@pytest.mark.timeout(60)
def test_missing_shard_or_other_tokenizer_fails_at_construction(shard_set, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(shard_set, copy)
    (copy / shard_name(4)).unlink()
    with pytest.raises(FileNotFoundError, match=shard_name(4)):
        make_stream(copy)
    shutil.copy(shard_set / shard_name(4), copy / shard_name(4))
    index = ShardIndex.load(copy)
    index.tokenizer = "some-other-tokenizer"
    index.save(copy)
    with pytest.raises(ValueError, match="some-other-tokenizer"):
        make_stream(copy)


@pytest.mark.timeout(60)
def test_state_only_loads_into_a_matching_reader(shard_set):
    stream = make_stream(shard_set, num_workers=0)
    take(stream, 3)
    state = stream.state_dict()
    with pytest.raises(ValueError, match="rank"):
        make_stream(shard_set, rank=1, num_workers=0).load_state_dict(state)
    with pytest.raises(ValueError, match="batch size"):
        make_stream(shard_set, num_workers=0, batch_size=3).load_state_dict(state)
    with pytest.raises(ValueError, match="loader_workers"):
        make_stream(shard_set, num_workers=2).load_state_dict(state)
    take(stream, stream.steps_per_epoch - 3)  # at an epoch boundary the worker count may change
    other_workers = make_stream(shard_set, num_workers=2)
    other_workers.load_state_dict(stream.state_dict())
    assert other_workers.epoch == 1


@pytest.mark.timeout(60)
def test_batches_follow_the_contract(shard_set):
    stream = make_stream(shard_set, world_size=1, num_workers=0, max_nps=3, np_length=8)
    with closing(iter(stream)) as batches:
        batch = next(batches)
    assert batch["reference_image"].shape == batch["target_image"].shape == (BATCH, 3, 64, 64)
    assert batch["reference_image"].dtype == batch["target_image"].dtype == torch.uint8  # normalised on the device
    assert batch["caption_ids"].shape == (BATCH, 77) and batch["caption_ids"].dtype == torch.int64
    assert batch["np_spans"].shape == (BATCH, 3, 2) and batch["np_spans"].dtype == torch.int64
    assert batch["np_mask"].shape == (BATCH, 3) and batch["np_mask"].dtype == torch.bool
    assert batch["np_ids"].shape == (BATCH, 3, 8) and batch["np_ids"].dtype == torch.int64
    assert len(batch["keys"]) == len(batch["captions"]) == len(batch["noun_phrases"]) == BATCH
    assert set(batch) == {
        "reference_image", "target_image", "caption_ids", "np_spans", "np_mask", "np_ids", "np_boxes", "keys",
        "captions", "noun_phrases",
    }  # fmt: skip
    assert batch["np_boxes"].shape == (BATCH, 3, 4) and torch.isnan(batch["np_boxes"]).all()  # no box in these shards
    for row in range(BATCH):
        phrases = batch["noun_phrases"][row]
        assert batch["np_mask"][row].tolist() == [True, True, False]
        assert len(phrases) == 2 and all(phrase in batch["captions"][row] for phrase in phrases)
        caption_ids = batch["caption_ids"][row]
        for (start, end), np_ids in zip(batch["np_spans"][row][:2].tolist(), batch["np_ids"][row][:2]):
            # A span covers the phrase's own tokens: those between its start and end tokens when encoded alone.
            assert caption_ids[start:end].tolist() == np_ids[1 : 1 + end - start].tolist()
        assert batch["np_spans"][row][2].tolist() == [0, 0] and not batch["np_ids"][row][2].any()
    # Solid-colour fixtures stay solid after the open_clip resize and crop: one pixel value per channel.
    image = batch["reference_image"][0].float()
    assert torch.allclose(image, image.mean(dim=(1, 2), keepdim=True), atol=7)  # about 0.1 after normalising


def config_overrides(shard_set) -> list[str]:
    return [
        f"data.shards_dir={shard_set}",
        "model.backbone=ContextTiny",
        "train.micro_batch=4",
        "train.global_batch=8",
        "cluster.num_workers=2",
    ]


@pytest.mark.timeout(60)
def test_loader_benchmark_reports_throughput_per_core(shard_set):
    from cluster.root_config import load_config
    from training.perf.loader import loader_benchmark

    config = load_config(None, [*config_overrides(shard_set), "data.loader_workers=0"])
    result = loader_benchmark(config, seconds=0.5)
    assert result["workers"] == 0 and result["samples"] > 0 and result["processes"] == 1
    assert result["samples_per_s"] > 0 and result["samples_per_cpu_s"] > 0
    assert result["steps_per_epoch"] == sum(SIZES) // 4
    # With a loader worker the CPU of both processes counts: the worker decodes, the main process collates.
    with_worker = loader_benchmark(load_config(None, [*config_overrides(shard_set), "data.loader_workers=1"]), 0.5)
    assert with_worker["processes"] == 2 and with_worker["cpu_s"] > 0
