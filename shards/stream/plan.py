"""Which samples every (rank, loader slot) reads in an epoch, planned from the shard index alone.

The plan works on the *sample sequence* of an epoch: the shards in a seeded per-epoch order, concatenated, each
contributing as many samples as the index lists. The first `world_size * steps_per_epoch * batch_size` positions
are used and the tail is dropped, so every rank gets exactly `steps_per_epoch` batches whatever the shard sizes.
Rank r takes a contiguous range of the sequence; inside it every loader slot takes a contiguous sub-range sized to
the batches it delivers. A range may start or end inside a shard: the reader then skips tar members up to the
first sample it owns, which costs header reads only.

Batches of a rank are numbered j = 0 .. steps_per_epoch - 1 within an epoch; batch j comes from slot j % slots,
which is the order in which torch's DataLoader takes batches from its workers (round robin).
"""

from __future__ import annotations

import hashlib
import json
from bisect import bisect_right
from dataclasses import dataclass
from functools import cached_property
from itertools import accumulate

import numpy as np

_SEED_MODULUS = 2**63
_ORDER_STREAM = 1
_BUFFER_STREAM = 2


@dataclass(frozen=True)
class Piece:
    """Samples [first, stop) of one shard, numbered by their position in the tar."""

    shard: str
    first: int
    stop: int


@dataclass(frozen=True)
class StreamPlan:
    """The epoch layout of one shard set for a given world size, slot count and batch size."""

    shard_names: tuple[str, ...]
    shard_counts: tuple[int, ...]
    seed: int
    world_size: int
    slots_per_rank: int
    """Loader slots per rank: the number of loader workers, or 1 when the rank reads in its own process."""
    batch_size: int

    def __post_init__(self) -> None:
        if len(self.shard_names) != len(self.shard_counts):
            raise ValueError("shard_names and shard_counts differ in length")
        if self.world_size < 1 or self.slots_per_rank < 1 or self.batch_size < 1:
            raise ValueError("world_size, slots_per_rank and batch_size must be >= 1")
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"the shard set holds {self.total_samples} samples, fewer than one batch per rank "
                f"(world_size {self.world_size} x batch_size {self.batch_size} = {self.world_size * self.batch_size})"
            )

    @cached_property
    def total_samples(self) -> int:
        return sum(self.shard_counts)

    @cached_property
    def steps_per_epoch(self) -> int:
        """Batches every rank yields per epoch; the same on all ranks."""
        return self.total_samples // (self.world_size * self.batch_size)

    @property
    def samples_per_rank(self) -> int:
        return self.steps_per_epoch * self.batch_size

    @property
    def used_samples(self) -> int:
        """Samples of the epoch sequence that ranks read; the rest of the sequence is dropped."""
        return self.world_size * self.samples_per_rank

    @cached_property
    def fingerprint(self) -> str:
        """Short hash of everything that shapes the plan; a mid-epoch reader state only fits the same one."""
        return _short_hash([self.epoch_fingerprint, self.slots_per_rank])

    @cached_property
    def epoch_fingerprint(self) -> str:
        """Hash of what shapes the epochs of a rank (not its slots); an epoch-boundary state only needs this."""
        return _short_hash([self.shard_names, self.shard_counts, self.seed, self.world_size, self.batch_size])

    def shard_order(self, epoch: int) -> list[int]:
        """Indices into `shard_names` in the order of `epoch`, a pure function of (seed, epoch)."""
        rng = np.random.default_rng([self.seed % _SEED_MODULUS, _ORDER_STREAM, epoch])
        return [int(i) for i in rng.permutation(len(self.shard_names))]

    def buffer_seed(self, epoch: int, rank: int, slot: int) -> list[int]:
        """Seed of the sample shuffle buffer of one slot in one epoch."""
        return [self.seed % _SEED_MODULUS, _BUFFER_STREAM, epoch, rank, slot]

    def slot_batches(self, slot: int) -> int:
        """Batches slot `slot` delivers per epoch: the j in [0, steps_per_epoch) with j % slots_per_rank == slot."""
        steps, slots = self.steps_per_epoch, self.slots_per_rank
        return max(0, (steps - slot + slots - 1) // slots)

    def slot_range(self, rank: int, slot: int) -> tuple[int, int]:
        """[start, stop) positions of the epoch sequence that (rank, slot) reads."""
        if not 0 <= rank < self.world_size or not 0 <= slot < self.slots_per_rank:
            raise ValueError(f"rank {rank} / slot {slot} out of range for {self.world_size} x {self.slots_per_rank}")
        start = rank * self.samples_per_rank + sum(self.slot_batches(s) for s in range(slot)) * self.batch_size
        return start, start + self.slot_batches(slot) * self.batch_size

    def pieces(self, epoch: int, start: int, length: int) -> list[Piece]:
        """The shard pieces covering `length` positions of the epoch sequence from `start`, wrapping at the end."""
        order = self.shard_order(epoch)
        counts = [self.shard_counts[i] for i in order]
        starts = list(accumulate(counts, initial=0))
        position = start % self.total_samples
        at = bisect_right(starts, position) - 1  # the last shard starting at or before `position` is non-empty
        pieces: list[Piece] = []
        remaining = length
        while remaining > 0:
            first = position - starts[at]
            stop = min(counts[at], first + remaining)
            if stop > first:
                pieces.append(Piece(self.shard_names[order[at]], first, stop))
                remaining -= stop - first
            at = (at + 1) % len(order)
            position = starts[at]
        return pieces

    def slot_pieces(self, epoch: int, rank: int, slot: int) -> list[Piece]:
        """What (rank, slot) reads in `epoch`, in order."""
        start, stop = self.slot_range(rank, slot)
        return self.pieces(epoch, start, stop - start)

    def refill_pieces(self, epoch: int, rank: int, slot: int) -> list[Piece]:
        """One full pass over the epoch sequence, starting in the dropped tail.

        A slot whose own samples turn out corrupt or truncated tops its batches up from here, so that it still
        delivers every batch it owes. The pass starts in the dropped tail, which no rank reads otherwise, at an
        offset of its own per slot so that slots topping up at once take different samples first.
        """
        slots = self.world_size * self.slots_per_rank
        tail = self.total_samples - self.used_samples
        start = self.used_samples + tail * (rank * self.slots_per_rank + slot) // slots
        return self.pieces(epoch, start, self.total_samples)

    def slot_of_worker(self, worker: int, epoch: int, start_step: int) -> int:
        """The slot that loader worker `worker` plays in `epoch` when the loader started at rank step `start_step`.

        The DataLoader asks worker 0 for the first batch it returns, then goes round robin; rotating the slots
        makes the batch of rank step t come from slot (t mod steps_per_epoch) mod slots_per_rank whatever step the
        loader started at, which is what makes a mid-epoch resume continue the same sequence.
        """
        return (worker + start_step - epoch * self.steps_per_epoch) % self.slots_per_rank

    def slot_of_step(self, step: int) -> tuple[int, int]:
        """(epoch, slot) that rank step `step` (counted across epochs) comes from."""
        epoch, within = divmod(step, self.steps_per_epoch)
        return epoch, within % self.slots_per_rank


def _short_hash(payload: object) -> str:
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:16]
