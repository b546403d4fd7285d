"""The distributed, exactly resumable streaming reader over a WebDataset shard set.

Pipeline, per rank: seeded per-epoch shard order -> contiguous share of the epoch's sample sequence for this rank
-> one share per loader slot -> tar members -> grouped samples -> seeded shuffle buffer -> decode (open_clip
transform of the backbone) -> batch. `shards.stream.plan` plans the shares from the index counts alone, so every
rank knows `steps_per_epoch` at construction and all ranks run the same number of steps; `shards.stream.slot` runs one
share and records its exact position in every batch; this module runs the slots in torch DataLoader workers and
keeps, on the consumer side, the positions of the batches actually handed out.

    stream = ShardStream("data/shards/tiny", backbone="ContextTiny", batch_size=32, rank=0, world_size=2)
    for step, batch in zip(range(100), stream):
        ...
    state = stream.state_dict()            # JSON; save it with the checkpoint
    resumed = ShardStream(...same arguments...)
    resumed.load_state_dict(state)         # the next batch is the one that would have come next
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from shards.config import DataConfig
from shards.format import INDEX_NAME, ShardIndex
from shards.model_inputs import CONTEXT_LENGTH, tokenizer_name
from shards.storage import ShardStore
from shards.stream.plan import StreamPlan
from shards.stream.slot import SlotCursor, SlotSpec, slot_batches

logger = logging.getLogger(__name__)

STATE_VERSION = 1
_CURSOR_KEY = "_cursor"


class _RankBatches(IterableDataset):
    """A rank's batches from `start_step` on, epoch after epoch; each loader worker plays one slot per epoch."""

    def __init__(self, spec: SlotSpec, start_step: int, start_cursors: dict[int, dict[str, Any]]) -> None:
        super().__init__()
        self.spec = spec
        self.start_step = start_step
        self.start_cursors = start_cursors

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        plan = self.spec.plan
        start_epoch = self.start_step // plan.steps_per_epoch
        epoch = start_epoch
        while True:
            slot = plan.slot_of_worker(worker, epoch, self.start_step)
            saved = self.start_cursors.get(slot) if epoch == start_epoch else None
            cursor = SlotCursor.from_json(saved) if saved is not None else SlotCursor(epoch=epoch, slot=slot)
            yield from slot_batches(self.spec, cursor)
            epoch += 1


def verified_index(shards: str | Path | ShardStore, backbone: str) -> ShardIndex:
    """The shard set's index, once every shard it lists is present and its tokenizer is the backbone's.

    Raises:
        FileNotFoundError: no index, or a listed shard is absent (named in the message).
        ValueError: an unreadable index, or shards tokenized for another backbone.
        ShardStorageError: the store cannot be reached (after retries), or refuses access.
    """
    store = shards if isinstance(shards, ShardStore) else ShardStore(str(shards))
    index = ShardIndex.load(store)
    if store.listable:
        present = set(store.names())  # one listing, not a request per shard
        missing = [entry.name for entry in index.shards if entry.name not in present]
    else:
        missing = [entry.name for entry in index.shards if not store.exists(entry.name)]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise FileNotFoundError(f"shard(s) listed in {store.where(INDEX_NAME)} are missing: {shown}")
    expected_tokenizer = tokenizer_name(backbone)
    if index.tokenizer != expected_tokenizer or index.context_length != CONTEXT_LENGTH:
        raise ValueError(
            f"{store.location}: shards were tokenized with {index.tokenizer} (context {index.context_length}), "
            f"backbone {backbone} uses {expected_tokenizer} (context {CONTEXT_LENGTH}); rebuild the shards"
        )
    return index


class ShardStream:
    """Batches of one rank over a shard set, epoch after epoch without end, resumable mid-epoch exactly.

    Batches follow the reader contract: `reference_image`, `target_image` (uint8 B,3,H,W: the backbone's open_clip
    eval transform before `ToTensor` and `Normalize`, which the model applies on its device), `caption_ids` (int64
    B,77), `np_spans` (int64 B,N,2), `np_mask` (bool B,N), `np_ids` (int64 B,N,L), `np_boxes` (float32 B,N,4),
    `keys`, `captions`, `noun_phrases`.
    """

    def __init__(
        self,
        shards_dir: str | Path | ShardStore,
        *,
        backbone: str,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        max_nps: int = 10,
        np_length: int = 16,
    ) -> None:
        """Check the shard set and plan the epochs; nothing is read until iteration.

        Args:
            shards_dir: directory or URL holding `index.json` and the tar shards it lists, or its `ShardStore`.
            backbone: open_clip model name; sets the image transform and must match the index's tokenizer.
            batch_size: samples per batch on this rank.
            rank, world_size: this rank among the ranks reading the same shard set.
            num_workers: loader worker processes; 0 reads in the calling process.
            seed: seeds the per-epoch shard order and the shuffle buffers.
            shuffle_buffer: samples held by each slot's shuffle buffer.
            max_nps, np_length: padding of the noun-phrase arrays.

        Raises:
            FileNotFoundError: no index, or a shard listed in the index is absent (named in the message).
            ValueError: bad arguments, a tokenizer other than the backbone's, or fewer samples than one batch
                per rank.
        """
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if batch_size < 1 or num_workers < 0 or shuffle_buffer < 1:
            raise ValueError("batch_size and shuffle_buffer must be >= 1 and num_workers >= 0")
        self.store = shards_dir if isinstance(shards_dir, ShardStore) else ShardStore(str(shards_dir))
        index = verified_index(self.store, backbone)
        self.num_workers = num_workers
        self.rank = rank
        self.plan = StreamPlan(
            shard_names=tuple(entry.name for entry in index.shards),
            shard_counts=tuple(entry.count for entry in index.shards),
            seed=seed,
            world_size=world_size,
            slots_per_rank=max(num_workers, 1),
            batch_size=batch_size,
        )
        self._spec = SlotSpec(
            self.store,
            backbone,
            self.plan,
            rank,
            shuffle_buffer,
            max_nps,
            np_length,
            {entry.name: entry.sha256 for entry in index.shards},
        )
        self.steps_per_epoch = self.plan.steps_per_epoch
        self._step = 0
        self._cursor_epoch = 0
        self._cursors: dict[int, dict[str, Any]] = {}
        self._finished_stats: dict[str, int] = {}
        self._active: Iterator[dict[str, Any]] | None = None

    @property
    def step(self) -> int:
        """Batches handed out so far, across epochs."""
        return self._step

    @property
    def epoch(self) -> int:
        """Epoch of the next batch."""
        return self._step // self.steps_per_epoch

    @property
    def stats(self) -> dict[str, int]:
        """Problems met so far (corrupt_samples, truncated_shards, unsafe_members, ...), summed over slots."""
        totals = dict(self._finished_stats)
        for cursor in self._cursors.values():
            for kind, count in cursor["stats"].items():
                totals[kind] = totals.get(kind, 0) + count
        return totals

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.close()
        self._active = self._batches()
        return self._active

    def close(self) -> None:
        """Stop the loader workers of the running iteration, if any; the position is kept."""
        if self._active is not None:
            self._active.close()  # type: ignore[attr-defined]
            self._active = None

    def __enter__(self) -> ShardStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _batches(self) -> Iterator[dict[str, Any]]:
        self._roll_epoch(self.epoch)
        dataset = _RankBatches(self._spec, self._step, dict(self._cursors))
        if self.num_workers == 0:
            source: Iterator[dict[str, Any]] = iter(dataset)
        else:
            loader = DataLoader(
                dataset,
                batch_size=None,
                num_workers=self.num_workers,
                pin_memory=torch.cuda.is_available(),
                prefetch_factor=4,
            )
            source = iter(loader)
        try:
            while True:
                if self.num_workers == 0:
                    batch = _next_single_threaded(source)
                else:
                    batch = next(source)
                self._record(batch.pop(_CURSOR_KEY))
                yield batch
        finally:
            shutdown = getattr(source, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            del source

    def _roll_epoch(self, epoch: int) -> None:
        """Fold the slot positions of finished epochs into the totals; positions only matter in the current one."""
        if epoch != self._cursor_epoch:
            for cursor in self._cursors.values():
                for kind, count in cursor["stats"].items():
                    self._finished_stats[kind] = self._finished_stats.get(kind, 0) + count
            self._cursors = {}
            self._cursor_epoch = epoch

    def _record(self, cursor: dict[str, Any]) -> None:
        epoch, slot = self.plan.slot_of_step(self._step)
        if (cursor["epoch"], cursor["slot"]) != (epoch, slot):
            # The whole resume scheme rests on the loader handing out worker batches strictly round robin.
            raise RuntimeError(
                f"loader order broken at step {self._step}: expected epoch {epoch} slot {slot}, "
                f"got epoch {cursor['epoch']} slot {cursor['slot']}"
            )
        self._roll_epoch(epoch)
        self._cursors[slot] = cursor
        self._step += 1

    def state_dict(self) -> dict[str, Any]:
        """Position after the batches handed out so far; JSON-serialisable."""
        return {
            "version": STATE_VERSION,
            "plan": self.plan.fingerprint,
            "epoch_plan": self.plan.epoch_fingerprint,
            "rank": self.rank,
            "step": self._step,
            "cursor_epoch": self._cursor_epoch,
            "cursors": {str(slot): cursor for slot, cursor in sorted(self._cursors.items())},
            "finished_stats": dict(self._finished_stats),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`: the next batch is the one that would have followed it.

        Raises:
            ValueError: the state comes from another rank, another version, or a different plan (shard set,
                seed, world size, loader workers or batch size).
        """
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"reader state version {state.get('version')} is not {STATE_VERSION}")
        if state.get("rank") != self.rank:
            raise ValueError(f"reader state belongs to rank {state.get('rank')}, this reader is rank {self.rank}")
        if state.get("epoch_plan") != self.plan.epoch_fingerprint:
            raise ValueError(
                "reader state was saved with another shard set, seed, world size or batch size; "
                "an exact resume needs the same ones"
            )
        step = int(state["step"])
        same_slots = state.get("plan") == self.plan.fingerprint
        if not same_slots and step % self.steps_per_epoch:
            raise ValueError(
                f"reader state was saved mid-epoch (step {step}) with another number of loader workers; "
                "resume mid-epoch with the same data.loader_workers, or change it at an epoch boundary"
            )
        self.close()
        self._step = step
        self._cursor_epoch = int(state["cursor_epoch"])
        self._cursors = {int(slot): dict(cursor) for slot, cursor in state["cursors"].items()}
        self._finished_stats = {str(kind): int(count) for kind, count in state["finished_stats"].items()}
        self._roll_epoch(self.epoch)  # at an epoch boundary the old slot positions only add to the totals


def _next_single_threaded(source: Iterator[dict[str, Any]]) -> dict[str, Any]:
    """Next batch decoded with one torch thread, as loader workers do.

    Decoding runs many tiny tensor ops per image; torch's intra-op pool costs more than it gives there, and on a
    busy machine it collapses (measured 8 vs 63 samples/s at 224 px on two loaded cores). The caller's thread
    count is restored before the batch is returned.
    """
    threads = torch.get_num_threads()
    if threads == 1:
        return next(source)
    torch.set_num_threads(1)
    try:
        return next(source)
    finally:
        torch.set_num_threads(threads)


def shard_store(data: DataConfig) -> ShardStore:
    """Where `data.shards_dir` points, with the section's storage options and retry budget."""
    return ShardStore(data.shards_dir, dict(data.storage_options), retries=data.read_retries)


def build_reader(data: DataConfig, backbone: str, batch_size: int, rank: int, world_size: int) -> ShardStream:
    """The training reader for config section `data`."""
    return ShardStream(
        shard_store(data),
        backbone=backbone,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        num_workers=data.loader_workers,
        seed=data.seed,
        shuffle_buffer=data.shuffle_buffer,
        max_nps=data.noun_phrases.max_nps,
        np_length=data.noun_phrases.np_length,
    )
