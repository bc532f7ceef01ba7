"""Batches of decoded images from a shard set, for one rank of a (possibly distributed) job.

    loader = ShardLoader("runs/x/data/train", batch_size=64, rank=0, world_size=1, seed=0,
                         settings=recipe.data.loader)  # workers, streams, shuffle buffer, on_corrupt
    for batch in loader.batches(epoch=start_epoch, offset=samples_done_in_that_epoch):
        batch["image"]   # uint8 (B, C, H, W), or whatever `transform` returns, stacked; RGB
                         # batches come in channels_last memory format (.contiguous() for NCHW)
        batch["cls"]     # int64 (B,), -1 where a sample has no label
                         # (with `labels=`: the mapping's label, and the shards' own are never read)
        batch["key"]     # list of sample keys
        batch["epoch"], batch["index"]  # where this batch sits: resume after it at
                                        # (epoch, (index + 1) * batch_size)

Sets of arrays instead of images (a latent set's moments): `field="moments.npy"` batches that
`.npy` member as stored (e.g. float16) under batch["moments"] instead of batch["image"].

`batches` runs on across epochs without stopping its workers; `epoch(e)` gives one epoch. Every
rank gets the same number of batches per epoch, the order is fixed by the seed and the epoch (see
plan.py), and `offset` starts part-way through an epoch for exact resume. Random transforms are
seeded per batch, so a resumed run also repeats the augmentations.

Reading: each shard's index (index.py) gives every sample's key, label and member positions, so
a stream's samples for an epoch are arrays (rows.py) and a batch is a slice of them; what is left
per sample in Python is slicing its bytes from the memory-mapped shard and decoding them. The
shuffle is a jittered sort: a stream's samples are ordered by position + U(0, w), with w its share
of `shuffle_buffer`, so each moves by fewer than w places and shards are still read front to back.

Damaged data: with on_corrupt="error" (default) the first problem stops the stream with a message
naming the shard and member. With "skip" the loader logs each problem, replaces the lost samples
by repeats of good ones from the same batch (so that no rank runs short and hangs) and counts them
in `loader.lost`.
"""
from __future__ import annotations

import bisect
import json
import logging
import math
import random
import typing
from collections.abc import Callable, Iterator, Mapping
from itertools import chain, count
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dpt_scale.errors import ShardError, UserError
from dpt_scale.recipe.schema import Loader
from dpt_scale.shards.batch_fill import BatchFiller
from dpt_scale.shards.batchpool import BatchPool, PooledBatch, as_is
from dpt_scale.shards.decode import in_place_shape
from dpt_scale.shards.manifest import Manifest
from dpt_scale.shards.plan import EpochPlan, Segment
from dpt_scale.shards.rows import JSON_END, JSON_START, LABEL, SHARD
from dpt_scale.shards.shard_cache import ShardCache
from dpt_scale.shards.worker_errors import as_item, raise_if_error

log = logging.getLogger(__name__)
# the damaged-data policies are the recipe schema's `data.loader.on_corrupt` choices
POLICIES = typing.get_args(typing.get_type_hints(Loader)["on_corrupt"])
# A DataLoader item costs the main process ~150 us and a worker about as much, whatever it holds,
# a few percent of decoding a batch of small images; so a worker hands small batches over several
# at a time, up to BUNDLE of them or about BUNDLE_BYTES of images (docs/shards.md).
BUNDLE, BUNDLE_BYTES = 4, 1 << 20


class ShardLoader:
    def __init__(self, directory: str | Path, batch_size: int, *, rank: int, world_size: int,
                 settings: Loader | None = None, seed: int = 0, shuffle: bool = True, drop_last: bool = True,
                 transform: Callable | None = None, labels: Mapping[str, int] | None = None,
                 field: str | None = None, with_json: bool = False, pin_memory: bool = False):
        """`settings` are the recipe's `data.loader` (workers, streams, shuffle buffer, damaged-data
        policy); rank and world are the caller's, so that no rank reads another's samples by mistake."""
        settings = settings or Loader()
        if settings.on_corrupt not in POLICIES:
            raise UserError(f"on_corrupt must be one of {POLICIES}, got {settings.on_corrupt!r}")
        if field is not None and not field.endswith("npy"):
            raise UserError(f"field {field!r}: the loader batches images or a .npy member")
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is not one of world size {world_size}'s ranks 0..{world_size - 1}")
        self.dir = Path(directory)
        self.manifest = Manifest.load(self.dir)
        if field is None and self.manifest.image is None:
            raise ShardError(f"{self.dir}: this shard set holds no images")
        self.rank, self.world_size = rank, world_size
        self.batch_size, self.seed, self.shuffle, self.drop_last = batch_size, seed, shuffle, drop_last
        self.workers, self.streams = settings.workers, settings.streams
        self.shuffle_buffer, self.on_corrupt = settings.shuffle_buffer, settings.on_corrupt
        self.transform, self.pin_memory = transform, pin_memory
        # The member each sample adds to the batch, and the batch entry it goes to.
        self.field = field or self.manifest.image["field"]
        self.name = "image" if field is None else field.split(".")[0]
        self.channels = self.manifest.image["channels"] if field is None else None
        # JPEGs or PNGs of one size with no transform are decoded straight into the batch: (C, H, W) then.
        self.in_place = in_place_shape(self.manifest.image) if field is None and transform is None else None
        # `labels` replaces the shards' `cls` (pseudo-labels, or none at all for unlabelled data);
        # the shards' own labels are then never used, so hidden labels cannot leak into training.
        self.labels = labels
        self.with_json = with_json
        # the members a sample is read for
        self.fields = frozenset({self.field} | ({"cls"} if labels is None else set())
                                | ({"json"} if with_json else set()))
        self.lost = 0
        self.batches_per_epoch = self.plan(0).num_batches  # fails now if the set is too small
        if self.workers and self.streams % self.workers:
            raise UserError(f"{self.workers} dataloader workers do not divide {self.streams} streams; "
                            "set data.loader.workers to a divisor of data.loader.streams")
        self.bundle = self._bundle()

    def _bundle(self) -> int:
        """Batches per DataLoader item: several when batches are small, as long as bundle x workers
        divides the streams (so that each stream is still read by one worker; see _Stream)."""
        if not self.workers or self.in_place is None:
            return 1
        k = max(1, min(BUNDLE, BUNDLE_BYTES // (self.batch_size * math.prod(self.in_place))))
        while self.streams % (k * self.workers):
            k -= 1
        return k

    def plan(self, epoch: int) -> EpochPlan:
        return EpochPlan([s.samples for s in self.manifest.shards], batch_size=self.batch_size,
                         world_size=self.world_size, rank=self.rank, seed=self.seed, epoch=epoch,
                         shuffle=self.shuffle, drop_last=self.drop_last, streams=self.streams)

    def __len__(self) -> int:
        """Batches per epoch (the same for every epoch and every rank)."""
        return self.batches_per_epoch

    def batches(self, epoch: int = 0, offset: int = 0) -> Iterator[dict]:
        """Batches from `offset` samples into `epoch` onwards, through all later epochs."""
        if offset % self.batch_size or offset > self.batch_size * self.batches_per_epoch:
            raise UserError(f"offset {offset} must be a multiple of the batch size {self.batch_size} "
                            f"and at most {self.batch_size * self.batches_per_epoch} (one epoch)")
        pool = BatchPool(self.workers, shared=self.workers > 0, pinned=self.pin_memory, bundle=self.bundle)
        stream = _Stream(self, epoch, offset // self.batch_size, pool)
        # A private generator: DataLoader would otherwise draw its worker seed from the caller's
        # global RNG, shifting the caller's random numbers (a resumed run would draw differently).
        source = iter(stream) if self.workers == 0 else iter(DataLoader(
            stream, batch_size=None, num_workers=self.workers, pin_memory=self.pin_memory,
            collate_fn=as_is, generator=torch.Generator().manual_seed(self.seed)))
        current, lost = epoch, 0
        try:
            for bundle in source:
                for batch in bundle:
                    raise_if_error(batch)
                    batch[self.name] = pool.received(*batch.pop("slot"), batch[self.name])
                    batch["cls"], batch["key"] = torch.from_numpy(batch["cls"]), batch["key"].tolist()
                    pool.hand_back()
                    if batch["epoch"] != current:
                        self._report(current, lost)
                        current, lost = batch["epoch"], 0
                    lost += batch.pop("lost")
                    yield batch
        finally:
            self._report(current, lost)

    def epoch(self, epoch: int, offset: int = 0) -> Iterator[dict]:
        """The batches of one epoch, from `offset` samples in."""
        source = self.batches(epoch, offset)
        try:
            for _ in range(self.batches_per_epoch - offset // self.batch_size):
                yield next(source)
        finally:
            source.close()

    def _report(self, epoch: int, lost: int) -> None:
        if lost:
            self.lost += lost
            log.warning(f"{self.dir}: epoch {epoch}: {lost} damaged sample(s) were replaced by repeats "
                        f"(on_corrupt=skip); find them with `dpt-scale shards verify {self.dir}`")


class _Stream(IterableDataset):
    """The rank's batches from (first_epoch, first_batch) on, as lists of `bundle` batches; inside a
    DataLoader worker, that worker's share. DataLoader hands out items round-robin, so worker w
    delivers items w, w + W, w + 2W, ..., item i holding batches iK to iK + K - 1 counted from the
    start (K = bundle). Inside an epoch, two batches of one stream are S apart, and KW divides the
    S streams, so they fall to the same worker: each stream is read by one worker alone."""

    def __init__(self, loader: ShardLoader, first_epoch: int, first_batch: int, pool: BatchPool):
        self.ld, self.first_epoch, self.first_batch, self.pool = loader, first_epoch, first_batch, pool
        self.shards = ShardCache(loader.dir, loader.manifest, loader.field, loader.with_json, loader.labels)
        self.filler = BatchFiller(loader, self.shards)
        self.jitter: np.ndarray | None = None  # the epoch's shuffle draw

    def __iter__(self) -> Iterator[list[dict]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        bundle = self.ld.bundle if info else 1
        batches = self._batches(worker, workers, bundle)
        while True:
            items = []
            try:
                for _ in range(bundle):
                    items.append(next(batches))
            except UserError as exc:
                if info is None:
                    raise
                yield items + [as_item(exc)]  # after the batches made before it
                return
            yield items

    def _batches(self, worker: int, workers: int, bundle: int) -> Iterator[dict]:
        first, per_epoch, plan, streams = self.first_batch, self.ld.batches_per_epoch, None, {}
        items = (range(first + i * bundle, first + (i + 1) * bundle) for i in count(worker, workers))
        for n in chain.from_iterable(items):  # the numbers of this worker's batches
            epoch, j = self.first_epoch + n // per_epoch, n % per_epoch
            if plan is None or plan.epoch != epoch:
                plan, streams, self.jitter = self.ld.plan(epoch), {}, None
                consumed = self.first_batch if epoch == self.first_epoch else 0
            v = plan.stream_of(j)
            if v not in streams:
                streams[v] = self._stream(plan, v, consumed)
            yield self._collate(plan, *streams[v].take(plan.batch_len(j)), j, worker)

    def _stream(self, plan: EpochPlan, v: int, consumed: int) -> "_Cursor":
        """Stream v's samples, shuffled, minus those of the first `consumed` batches of the epoch.
        The shuffle moves each sample by less than the stream's share of the shuffle buffer (a
        jittered sort), so a stream still reads its shards front to back, give or take that many."""
        parts = [self._segment(seg) for seg in plan.segments(v)]
        table, keys = (np.concatenate(column) for column in zip(*parts)) if len(parts) > 1 else parts[0]
        order = np.arange(len(table))
        if self.ld.shuffle:
            if self.jitter is None:  # one draw per epoch, which each stream takes its part of
                seed = random.Random(f"samples:{self.ld.seed}:{plan.epoch}:{self.ld.rank}").getrandbits(64)
                self.jitter = np.random.default_rng(seed).random(plan.samples)
            size = max(1, self.ld.shuffle_buffer // self.ld.streams)  # the rank's buffer, shared out
            start, stop = plan.stream_range(v)
            order = np.argsort(order + self.jitter[start:stop] * size, kind="stable")
        return _Cursor(table, keys, order[plan.skipped(v, consumed):])

    def _segment(self, seg: Segment) -> tuple[np.ndarray, np.ndarray]:
        """The rows (table, keys) of samples seg.start to seg.stop; shard -1 marks a lost one (policy
        skip)."""
        ld, entry = self.ld, self.ld.manifest.shards[seg.shard]
        try:
            rows = self.shards.rows(seg.shard)
        except ShardError as exc:  # a missing or unreadable shard
            if ld.on_corrupt == "error":
                raise
            n = seg.stop - seg.start
            log.warning(f"skipping {n} sample(s) of {entry.name}: {exc}")
            return np.full((n, 6 if ld.with_json else 4), -1, dtype=np.int64), np.full(n, "")
        table, keys = rows.table[seg.start:seg.stop], rows.keys[seg.start:seg.stop]
        bad = None if rows.bad is None else rows.bad[seg.start:seg.stop]
        if bad is not None and bad.any():
            message = rows.explain(seg.start + int(np.argmax(bad > 0)))
            if ld.on_corrupt == "error":
                raise ShardError(message)
            log.warning(f"skipping {int((bad > 0).sum())} sample(s) of {entry.name}: {message}")
            table = table.copy()  # (the shard's rows are kept for later epochs)
            table[bad > 0, SHARD] = -1
        return table, keys

    def _collate(self, plan: EpochPlan, table: np.ndarray, keys: np.ndarray, sound: bool, j: int,
                 worker: int) -> dict:
        """A batch decoded into a pooled buffer, with its labels, keys and JSON; lost samples are
        replaced by repeats of good ones. `sound`: no sample of the batch is lost or unreadable."""
        ld, size = self.ld, len(table)
        batch = PooledBatch(self.pool, worker, size, ld.dir, ld.in_place)
        seed = random.Random(f"augment:{ld.seed}:{plan.epoch}:{ld.rank}:{j}").getrandbits(63) if ld.transform else None
        good = self.filler.fill(batch, table, keys, sound, seed)
        out = {ld.name: batch.finish(), "lost": size - len(good), "slot": (worker, batch.slot),
               "epoch": plan.epoch, "index": j}
        if good:
            take = slice(None) if len(good) == size else np.asarray(good)[np.arange(size) % len(good)]
            # repeats stand in for lost samples; keys travel as one array (a list of strings
            # pickles string by string), listed on arrival
            out["cls"], out["key"] = np.ascontiguousarray(table[take, LABEL]), keys[take]
            if ld.with_json:
                rows = table[take][:, [SHARD, JSON_START, JSON_END]].tolist()
                maps = self.shards.maps(shard for shard, _, _ in rows)
                out["json"] = [None if start < 0 else json.loads(maps[shard][start:end]) for shard, start, end in rows]
        else:  # not one readable sample in the whole batch: the set's first stands in
            label, key, meta = batch.stand_in
            out["cls"], out["key"] = np.full(size, label, dtype=np.int64), np.full(size, key)
            if ld.with_json:
                out["json"] = [meta] * size
        return out


class _Cursor:
    """A stream's rows in the order they are read, taken a batch at a time: the rows are put in
    that order once, so that a batch is a slice."""

    def __init__(self, table: np.ndarray, keys: np.ndarray, order: np.ndarray):
        self.table, self.keys, self.pos = table.take(order, axis=0), keys.take(order), 0
        # where the lost and unreadable samples are (usually nowhere), to tell a sound batch
        lost = self.table[:, SHARD] < 0
        self.unsound = np.flatnonzero(lost).tolist() if lost.any() else []

    def take(self, n: int) -> tuple[np.ndarray, np.ndarray, bool]:
        """The next n rows (table, keys), and whether every one of them is sound."""
        at, self.pos = self.pos, self.pos + n
        sound = bisect.bisect_left(self.unsound, at) == bisect.bisect_left(self.unsound, self.pos)
        return self.table[at:self.pos], self.keys[at:self.pos], sound
