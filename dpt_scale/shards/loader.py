"""Batches of decoded images from a shard set, for one rank of a (possibly distributed) job.

    loader = ShardLoader("runs/x/data/train", batch_size=64, seed=0, workers=2, streams=24)
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

Damaged data: with on_corrupt="error" (default) the first problem stops the stream with a message
naming the shard and member. With "skip" the loader logs each problem, replaces the lost samples
by repeats of good ones from the same batch (so that no rank runs short and hangs) and counts them
in `loader.lost`.
"""
from __future__ import annotations

import io
import json
import logging
import random
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from itertools import chain, count, cycle, islice, repeat
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dpt_scale.distributed import rank_and_world
from dpt_scale.errors import ShardError, UserError
from dpt_scale.shards.batchpool import BatchPool
from dpt_scale.shards.decode import ImageDecodeError, decode_image, decode_jpeg_into
from dpt_scale.shards.manifest import Manifest
from dpt_scale.shards.plan import EpochPlan, Segment
from dpt_scale.shards.tar import iter_samples

log = logging.getLogger(__name__)
POLICIES = ("error", "skip")


class ShardLoader:
    def __init__(self, directory: str | Path, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = True, transform: Callable | None = None, workers: int = 0,
                 streams: int = 1, shuffle_buffer: int = 4096, on_corrupt: str = "error",
                 rank: int | None = None, world_size: int | None = None, with_json: bool = False,
                 pin_memory: bool = False, labels: Mapping[str, int] | None = None, field: str | None = None):
        if on_corrupt not in POLICIES:
            raise UserError(f"on_corrupt must be one of {POLICIES}, got {on_corrupt!r}")
        if field is not None and not field.endswith("npy"):
            raise UserError(f"field {field!r}: the loader batches images or a .npy member")
        self.dir = Path(directory)
        self.manifest = Manifest.load(self.dir)
        if field is None and self.manifest.image is None:
            raise ShardError(f"{self.dir}: this shard set holds no images")
        env_rank, env_world = rank_and_world()
        self.rank = env_rank if rank is None else rank
        self.world_size = env_world if world_size is None else world_size
        self.batch_size, self.seed, self.shuffle, self.drop_last = batch_size, seed, shuffle, drop_last
        self.transform, self.workers, self.streams = transform, workers, streams
        self.shuffle_buffer, self.on_corrupt, self.pin_memory = shuffle_buffer, on_corrupt, pin_memory
        # The member each sample adds to the batch, and the batch entry it goes to.
        self.field = field or self.manifest.image["field"]
        self.name = "image" if field is None else field.split(".")[0]
        self.channels = self.manifest.image["channels"] if field is None else None
        # JPEGs of one size with no transform are decoded straight into the batch: (C, H, W) then.
        image = self.manifest.image
        self.in_place = ((self.channels, *image["size"]) if field is None and transform is None
                         and image["field"] in ("jpg", "jpeg") and image["size"] else None)
        # `labels` replaces the shards' `cls` (pseudo-labels, or none at all for unlabelled data);
        # the `cls` members are then not even read, so hidden labels cannot leak into training.
        self.labels = labels
        self.fields = frozenset({self.field} | ({"cls"} if labels is None else set())
                                | ({"json"} if with_json else set()))
        self.lost = 0
        self.batches_per_epoch = self.plan(0).num_batches  # fails now if the set is too small
        if workers and streams % workers:
            raise UserError(f"{workers} dataloader workers do not divide {streams} streams; "
                            "set data.loader.workers to a divisor of data.loader.streams")

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
        pool = BatchPool(self.workers, shared=self.workers > 0, pinned=self.pin_memory)
        stream = _Stream(self, epoch, offset // self.batch_size, pool)
        # A private generator: DataLoader would otherwise draw its worker seed from the caller's
        # global RNG, shifting the caller's random numbers (a resumed run would draw differently).
        source = iter(stream) if self.workers == 0 else iter(DataLoader(
            stream, batch_size=None, num_workers=self.workers, pin_memory=self.pin_memory,
            collate_fn=_as_is, generator=torch.Generator().manual_seed(self.seed)))
        current, lost = epoch, 0
        try:
            for batch in source:
                if "error" in batch:
                    is_shard_error, message = batch["error"]
                    raise (ShardError if is_shard_error else UserError)(message)
                batch[self.name] = pool.received(*batch.pop("slot"), batch[self.name])
                batch["cls"] = torch.from_numpy(batch["cls"])
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
    """The rank's batches from (first_epoch, first_batch) on; inside a DataLoader worker, that
    worker's share. DataLoader hands out work round-robin, so worker w delivers batches number
    w, w + W, w + 2W, ... counted from the start; inside an epoch those all come from the streams
    congruent to one residue mod W, which that worker alone reads (W divides the streams)."""

    def __init__(self, loader: ShardLoader, first_epoch: int, first_batch: int, pool: BatchPool):
        self.ld, self.first_epoch, self.first_batch, self.pool = loader, first_epoch, first_batch, pool

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        try:
            yield from self._batches(worker, workers)
        except UserError as exc:
            if info is None:
                raise
            # A worker's exception reaches the main process wrapped in a traceback; hand the
            # one-line message over as data instead.
            yield {"error": (isinstance(exc, ShardError), str(exc))}

    def _batches(self, worker: int, workers: int) -> Iterator[dict]:
        per_epoch, plan, streams = self.ld.batches_per_epoch, None, {}
        for n in count(self.first_batch + worker, workers):
            epoch, j = self.first_epoch + n // per_epoch, n % per_epoch
            if plan is None or plan.epoch != epoch:
                plan, streams = self.ld.plan(epoch), {}  # the old streams close their shards
                consumed = self.first_batch if epoch == self.first_epoch else 0
            v = plan.stream_of(j)
            if v not in streams:
                streams[v] = self._stream(plan, v, consumed)
            yield self._collate(plan, list(islice(streams[v], plan.batch_len(j))), j, worker)

    def _stream(self, plan: EpochPlan, v: int, consumed: int) -> Iterator[dict | None]:
        """Stream v's raw samples (None for a lost one), shuffled, minus those of the first
        `consumed` batches of the epoch."""
        samples = chain.from_iterable(self._segment(seg) for seg in plan.segments(v))
        if self.ld.shuffle:
            rng = random.Random(f"samples:{self.ld.seed}:{plan.epoch}:{self.ld.rank}:{v}")
            size = max(1, self.ld.shuffle_buffer // self.ld.streams)  # the rank's buffer, shared out
            samples = wds.shuffle(size, initial=size, rng=rng)(samples)
        return islice(samples, plan.skipped(v, consumed), None)

    def _segment(self, seg: Segment) -> Iterator[dict | None]:
        entry = self.ld.manifest.shards[seg.shard]
        path = self.ld.dir / entry.name
        want, got = seg.stop - seg.start, 0
        try:
            seek = self.ld.manifest.seek(seg.shard, seg.start)
            for sample in iter_samples(path, seg.start, seg.stop, fields=self.ld.fields, seek=seek):
                sample["__shard__"] = entry.name
                got += 1
                yield sample
            if got < want:
                raise ShardError(f"{path}: ends after {seg.start + got} samples but the manifest lists "
                                 f"{entry.samples}; run `dpt-scale shards verify {self.ld.dir}`")
        except ShardError as exc:
            if self.ld.on_corrupt == "error":
                raise
            log.warning(f"skipping {want - got} sample(s) of {entry.name}: {exc}")
        yield from repeat(None, want - got)

    def _collate(self, plan: EpochPlan, raw: list[dict | None], j: int, worker: int) -> dict:
        """Decode a batch into a pooled buffer a chunk of images at a time: holding a whole batch of
        decoded images first would cost fresh memory (page faults) every batch for large images,
        and copying them one by one costs more than stacking for small ones."""
        batch = _Batch(self.pool, worker, len(raw), self.ld.dir, self.ld.name, self.ld.in_place)
        seed = random.Random(f"augment:{self.ld.seed}:{plan.epoch}:{self.ld.rank}:{j}").getrandbits(63)
        with _seeded(seed) if self.ld.transform else nullcontext():
            for sample in raw:
                batch.add(None if sample is None else self._decode(sample, batch.place()))
            if batch.filled == 0 and not batch.pending:  # not one readable sample in the whole batch
                batch.add(self._first_readable())  # stands in; the batch's samples stay counted as lost
        out = batch.finish()
        out.update(epoch=plan.epoch, index=j)
        if "json" not in self.ld.fields:
            del out["json"]
        return out

    def _decode(self, sample: dict, place: np.ndarray | None = None) -> tuple | None:
        """(image, class, key, json) of a raw sample; None if it is damaged and the policy skips.
        The image is None when it was decoded straight into `place`."""
        key, field = sample["__key__"], self.ld.field
        try:
            data = sample[field]
            if place is not None and decode_jpeg_into(data, place):
                image = None
            else:
                image = _load_array(data) if self.ld.channels is None else decode_image(data, self.ld.channels)
            if self.ld.labels is not None:
                label = self.ld.labels.get(key, -1)
            else:
                label = int(sample["cls"]) if "cls" in sample else -1
        except (KeyError, ValueError) as exc:
            problem = (f"sample '{key}' has no .{field} member" if isinstance(exc, KeyError) else
                       f"member '{key}.{field}' does not decode ({exc})" if isinstance(exc, ImageDecodeError) else
                       f"member '{key}.cls' is not an integer")
            message = f"{self.ld.dir / sample['__shard__']}: {problem}"
            if self.ld.on_corrupt == "error":
                raise ShardError(message) from None
            log.warning(f"skipping a damaged sample: {message}")
            return None
        if self.ld.transform is not None:  # (never with `place`)
            image = self.ld.transform(image)
        return image, label, key, json.loads(sample["json"]) if "json" in sample else None

    def _first_readable(self) -> tuple:
        """Stand-in for a batch with no readable sample: the first good sample of the set. (Not the
        last good one this worker saw: a batch must depend only on the plan, or resume would differ.)"""
        for entry in self.ld.manifest.shards:
            try:
                for sample in iter_samples(self.ld.dir / entry.name, fields=self.ld.fields):
                    sample["__shard__"] = entry.name
                    item = self._decode(sample)
                    if item is not None:
                        return item
            except ShardError:
                continue
        raise ShardError(f"{self.ld.dir}: not one sample of the set is readable; run `dpt-scale shards verify`")


class _Batch:
    """Decoded samples gathered into a pooled buffer, CHUNK at a time, good samples first; lost
    ones (None) are counted and replaced at the end by repeats of the good ones. With `in_place`
    (the (C, H, W) of every image), the buffer is taken at once and `place()` is where the next
    image may be decoded."""

    CHUNK = 16

    def __init__(self, pool: BatchPool, worker: int, size: int, where: Path, name: str,
                 in_place: tuple[int, int, int] | None = None):
        self.pool, self.worker, self.size, self.where, self.name = pool, worker, size, where, name
        self.images, self.slot, self.filled, self.lost = None, -1, 0, 0
        self.pending: list[tuple] = []
        self.meta: list[tuple] = []  # (class, key, json) of each filled position
        self.hwc = None  # in place: the buffer as (B, H, W, C) arrays, the decoders' layout
        if in_place:
            self.images, self.slot = pool.take(worker, (size, *in_place), torch.uint8, in_place[0] > 1)
            self.hwc = self.images.permute(0, 2, 3, 1).numpy()

    def place(self) -> np.ndarray | None:
        return None if self.hwc is None else self.hwc[self.filled]

    def add(self, item: tuple | None) -> None:
        if item is None:
            self.lost += 1
            return
        if self.hwc is not None:  # in place; an image the JPEG decoder could not place is copied
            if item[0] is not None:
                self.pending.append(item)
                self._flush()
            else:
                self.meta.append(item[1:])
                self.filled += 1
            return
        self.pending.append(item)
        if len(self.pending) == self.CHUNK:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        first = self.pending[0][0]
        if self.images is None:
            if not isinstance(first, torch.Tensor):
                raise UserError(f"the loader's transform must return a tensor, not {type(first).__name__}")
            # The decoders give (C, H, W) views of (H, W, C) memory; a batch laid out the same way
            # (channels_last) fills with plain copies, 10x faster than transposing (benchmarks.md).
            hwc = first.dim() == 3 and first.shape[0] > 1 and first.stride(0) == 1
            self.images, self.slot = self.pool.take(self.worker, (self.size, *first.shape), first.dtype, hwc)
        end = self.filled + len(self.pending)
        # Checked here: stack(out=) would resize a slice of another shape instead of failing.
        if any(it[0].shape != self.images.shape[1:] for it in self.pending):
            shapes = sorted({tuple(it[0].shape) for it in self.pending} | {tuple(self.images.shape[1:])})
            raise UserError(f"{self.where}: images of different shapes {shapes[:3]} cannot form a batch; "
                            "import with a fixed image size or pass a transform that resizes")
        torch.stack([it[0] for it in self.pending], out=self.images[self.filled:end])
        self.meta += [it[1:] for it in self.pending]
        self.filled, self.pending = end, []

    def finish(self) -> dict:
        self._flush()
        for pos in range(self.filled, self.size):  # repeats of good samples stand in for lost ones
            self.images[pos].copy_(self.images[pos - self.filled])
            self.meta.append(self.meta[pos - self.filled])
        return {self.name: self.pool.send(self.slot, self.images),
                "cls": np.array([m[0] for m in self.meta], dtype=np.int64),
                "key": [m[1] for m in self.meta], "json": [m[2] for m in self.meta],
                "lost": self.lost, "slot": (self.worker, self.slot)}


def _as_is(batch: dict) -> dict:
    """DataLoader's default would turn the `cls` array into a tensor, which crosses to the main
    process through a new shared-memory segment per batch; an array is pickled with the batch."""
    return batch


def _load_array(data: bytes) -> torch.Tensor:
    """A `.npy` member as a tensor of its stored dtype (damage raises the loader's 'does not decode')."""
    try:
        return torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False).copy())  # copy: np.load's is read-only
    except (ValueError, EOFError) as exc:
        raise ImageDecodeError(f"not a readable .npy array: {exc}") from None


@contextmanager
def _seeded(seed: int):
    """Seed torch, numpy and `random` (all used by torchvision/timm augmentations), restoring their
    states afterwards so that loading in-process leaves the training RNG untouched."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
