"""One loader slot's share of an epoch: read its shard pieces, shuffle, decode, batch, and resume exactly.

A slot's position is a `SlotCursor` of plain counters: batches delivered, records pushed into the shuffle buffer,
items the buffer emitted, and records read while topping up. Every batch carries the cursor as it stood right
after that batch, so whoever consumes the batches knows exactly where each slot is.

Resuming replays the shuffle buffer on record numbers alone (its draws depend only on how many items it holds,
never on their content), which tells which records were still in the buffer and in which positions. The slot
then re-reads its pieces reading the bytes of those records only, skipping the rest by their tar headers, and
carries on with the same random draws: the batches that follow are the ones an uninterrupted run would produce.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from shards.storage import ShardStore
from shards.stream.decode import REFILLED_SAMPLES, Record, SkipAndCount, collate, decode_stage, read_records
from shards.stream.plan import StreamPlan

logger = logging.getLogger(__name__)

_DRAW_BLOCK = 1024


class ShuffleBuffer:
    """Seeded shuffle buffer whose random choices depend only on the number of items it holds.

    Until full it only collects; then every push emits a random held item and takes its place; once the input
    ends, `pop` empties it in random order.
    """

    def __init__(self, capacity: int, seed: list[int]) -> None:
        self.capacity = capacity
        self.items: list[Any] = []
        self._rng = np.random.default_rng(seed)
        self._draws = np.empty(0)
        self._next_draw = 0

    def _position(self, size: int) -> int:
        if self._next_draw == len(self._draws):
            # Drawing in blocks keeps the per-item cost low; the sequence is the same however it is consumed.
            self._draws = self._rng.random(_DRAW_BLOCK)
            self._next_draw = 0
        value = self._draws[self._next_draw]
        self._next_draw += 1
        return min(int(value * size), size - 1)

    def push(self, item: Any) -> tuple[bool, Any]:
        """Add `item`; returns (True, emitted item) once the buffer is full, else (False, None)."""
        if len(self.items) < self.capacity:
            self.items.append(item)
            return False, None
        position = self._position(len(self.items))
        emitted, self.items[position] = self.items[position], item
        return True, emitted

    def pop(self) -> Any:
        """Remove and return a random held item (input exhausted)."""
        position = self._position(len(self.items))
        emitted = self.items[position]
        self.items[position] = self.items[-1]
        self.items.pop()
        return emitted

    def replay(self, pushed: int, emitted: int, drained: bool) -> list[int]:
        """Put an empty buffer in the state after `pushed` pushes and `emitted` emissions, on record numbers.

        Returns the record numbers it now holds, in buffer order; the random draws continue from there.
        """
        if self.items or self._next_draw or len(self._draws):
            raise RuntimeError("replay needs a fresh buffer")
        count = 0
        for number in range(pushed):
            count += self.push(number)[0]
        if not drained and count != emitted:
            raise ValueError(f"inconsistent slot cursor: {pushed} records pushed give {count} emitted, not {emitted}")
        while count < emitted:
            if not self.items:
                raise ValueError(f"inconsistent slot cursor: {emitted} emitted from {pushed} records")
            self.pop()
            count += 1
        return list(self.items)


@dataclass
class SlotCursor:
    """Where one slot stands in one epoch; JSON-friendly."""

    epoch: int
    slot: int
    batches: int = 0
    """Batches this slot has delivered in the epoch."""
    records: int = 0
    """Records of its own range pushed into the shuffle buffer."""
    emitted: int = 0
    """Items the shuffle buffer has emitted (decodable or not)."""
    drained: bool = False
    """Its own range is read to the end and the buffer is emptying."""
    refill_records: int = 0
    """Records read from outside its range to top up after losses."""
    refill_misses: int = 0
    """Top-up records in a row that failed to decode; bounded so an all-corrupt shard set cannot loop forever."""
    stats: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, payload: dict[str, Any]) -> SlotCursor:
        return cls(**{**payload, "stats": dict(payload.get("stats", {}))})


@dataclass(frozen=True)
class SlotSpec:
    """What a slot needs besides its cursor; picklable so that loader worker processes get a copy."""

    store: ShardStore
    backbone: str
    plan: StreamPlan
    rank: int
    shuffle_buffer: int
    max_nps: int
    np_length: int
    digests: dict[str, str] = field(default_factory=dict, compare=False, hash=False)
    """Shard name -> sha256 from the index: a sidecar's byte offsets are used only for the shard it describes."""


def slot_batches(spec: SlotSpec, cursor: SlotCursor) -> Iterator[dict[str, Any]]:
    """The batches slot `cursor.slot` still owes in `cursor.epoch`, each with its cursor under `_cursor`."""
    plan, epoch = spec.plan, cursor.epoch
    owed = plan.slot_batches(cursor.slot)
    if cursor.batches >= owed:
        return
    where = f"rank {spec.rank} slot {cursor.slot} epoch {epoch}"
    handler = SkipAndCount(cursor.stats, where)
    buffer = ShuffleBuffer(spec.shuffle_buffer, plan.buffer_seed(epoch, spec.rank, cursor.slot))
    held = buffer.replay(cursor.records, cursor.emitted, cursor.drained)
    position_of = {number: position for position, number in enumerate(held)}
    replayed = cursor.records

    def wanted(number: int) -> bool:
        return number >= replayed or number in position_of

    source = read_records(spec.store, plan.slot_pieces(epoch, spec.rank, cursor.slot), handler, wanted, spec.digests)
    handler.muted = replayed > 0 or cursor.drained
    restored: list[Record | None] = [None] * len(held)
    for number in range(replayed):
        record = next(source, None)
        if record is None:
            logger.warning("%s: shards changed since the state was saved; resume is not exact", where)
            break
        if number in position_of:
            restored[position_of[number]] = record
    buffer.items = [record for record in restored if record is not None]
    if cursor.drained:
        for _ in source:  # reach the end the saved run had reached; its problems were counted then
            pass
    handler.muted = False

    def own_items() -> Iterator[Record]:
        for record in source:
            cursor.records += 1
            emitted, item = buffer.push(record)
            if emitted:
                cursor.emitted += 1
                yield item
        cursor.drained = True
        while buffer.items:
            cursor.emitted += 1
            yield buffer.pop()

    def refill_items() -> Iterator[Record]:
        skipped = cursor.refill_records
        handler.muted = skipped > 0
        pieces = plan.refill_pieces(epoch, spec.rank, cursor.slot)
        passed = 0
        while True:
            pass_start = passed

            def wanted_in_pass(number: int, pass_start: int = pass_start) -> bool:
                return pass_start + number >= skipped

            for record in read_records(spec.store, pieces, handler, wanted_in_pass, spec.digests):
                passed += 1
                if passed <= skipped:
                    handler.muted = passed < skipped
                    continue
                cursor.refill_records += 1
                if cursor.refill_misses > plan.total_samples:
                    raise RuntimeError(f"{where}: no decodable sample in a full pass over {spec.store.location}")
                yield record
            if passed == pass_start:
                raise RuntimeError(f"{where}: no readable sample in {spec.store.location}")

    def count_miss() -> None:
        cursor.refill_misses += 1

    own = decode_stage(own_items(), spec.backbone, spec.max_nps, spec.np_length, handler)
    refill = decode_stage(refill_items(), spec.backbone, spec.max_nps, spec.np_length, handler, count_miss)
    samples: list[dict[str, Any]] = []
    for stream, topping_up in ((own, False), (refill, True)):
        for sample in stream:
            if topping_up:
                cursor.refill_misses = 0
                cursor.stats[REFILLED_SAMPLES] = cursor.stats.get(REFILLED_SAMPLES, 0) + 1
            samples.append(sample)
            if len(samples) == plan.batch_size:
                cursor.batches += 1
                batch = collate(samples)
                batch["_cursor"] = cursor.to_json()
                samples = []
                yield batch
                if cursor.batches >= owed:
                    return
