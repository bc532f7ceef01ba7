"""Which samples one rank reads in one epoch, and in which order. Pure arithmetic over the
manifest's per-shard counts; no I/O, so every rank computes the same plan without talking.

1. The shards are put in an order drawn from (seed, epoch) and thought of as one long sequence.
2. Every rank takes an equal, contiguous slice of it (`total // world_size` samples, rounded down
   to whole batches with `drop_last`), so uneven shards cannot make one rank run out early and
   hang a collective. At most `world_size - 1` samples (plus a partial batch) sit out an epoch,
   and which ones changes from epoch to epoch.
3. The rank's batches are dealt to `streams` virtual streams: batch j comes from stream j % streams,
   and each stream reads its own contiguous piece of the rank's slice through its own shuffle
   buffer. DataLoader workers each serve whole streams (loader.py), so the order depends on
   (seed, epoch, world size, rank, batch size, streams) but not on the number of workers.
4. Resuming at batch b: every stream skips the samples of its batches before b.
"""
from __future__ import annotations

import bisect
import random
from dataclasses import dataclass
from itertools import accumulate

from dpt_scale.errors import UserError


@dataclass(frozen=True)
class Segment:
    shard: int  # index into the manifest's shard list
    start: int  # first sample index within the shard
    stop: int  # one past the last


class EpochPlan:
    def __init__(self, counts: list[int], *, batch_size: int, world_size: int = 1, rank: int = 0,
                 seed: int = 0, epoch: int = 0, shuffle: bool = True, drop_last: bool = True,
                 streams: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if batch_size < 1 or streams < 1:
            raise UserError(f"batch size ({batch_size}) and streams ({streams}) must be at least 1")
        self.batch_size, self.streams, self.seed, self.epoch = batch_size, streams, seed, epoch
        self.order = list(range(len(counts)))
        if shuffle:
            random.Random(f"shards:{seed}:{epoch}").shuffle(self.order)
        self._ends = list(accumulate(counts[i] for i in self.order))
        total = self._ends[-1] if self._ends else 0
        share = total // world_size
        self.samples = share // batch_size * batch_size if drop_last else share
        if self.samples == 0:
            raise UserError(f"the shard set holds {total} samples: too few for {world_size} rank(s) with batch "
                            f"size {batch_size}; lower the batch size or add data")
        self.num_batches = -(-self.samples // batch_size)
        first = rank * share
        sizes = [sum(self.batch_len(j) for j in range(v, self.num_batches, streams)) for v in range(streams)]
        starts = [first + s for s in accumulate([0] + sizes[:-1])]
        self._stream_ranges = [(a, a + n) for a, n in zip(starts, sizes)]
        self._first = first

    def stream_range(self, stream: int) -> tuple[int, int]:
        """Where `stream`'s samples lie within the rank's slice: [start, stop) from 0 to `samples`."""
        lo, hi = self._stream_ranges[stream]
        return lo - self._first, hi - self._first

    def batch_len(self, j: int) -> int:
        return min(self.batch_size, self.samples - j * self.batch_size)

    def stream_of(self, j: int) -> int:
        return j % self.streams

    def segments(self, stream: int) -> list[Segment]:
        """The pieces of shards that `stream` reads, in order."""
        lo, hi = self._stream_ranges[stream]
        out = []
        k = bisect.bisect_right(self._ends, lo)
        while lo < hi:
            shard_start = self._ends[k - 1] if k else 0
            stop = min(hi, self._ends[k])
            out.append(Segment(self.order[k], lo - shard_start, stop - shard_start))
            lo, k = stop, k + 1
        return out

    def skipped(self, stream: int, first_batch: int) -> int:
        """Samples of `stream` that belong to batches before `first_batch` (already consumed)."""
        return sum(self.batch_len(j) for j in range(stream, min(first_batch, self.num_batches), self.streams))
