"""Reused batch buffers, so that a batch does not cost fresh memory every time.

A DataLoader worker normally puts every batch into a new shared-memory segment, and a large batch
in-process gets a new allocation; the first touch of fresh pages dominates on some machines (about
ten times the cost of stacking into reused memory: docs/shards.md). So each worker keeps a few
buffers (shared memory inside a DataLoader worker, ordinary memory in-process) and writes batches
into them.

A buffer crosses from a worker to the main process once: after that only its slot and layout
travel, and the main process rebuilds the batch over its own mapping of the buffer (sending a
shared tensor costs a file-descriptor handover per batch).

A buffer is reused only once nothing outside the pool refers to it any more: the main process
keeps one reference to each buffer it has received and, before each batch, hands back every
buffer whose storage has no other user (no tensor, view, NumPy array or alias of it is alive:
the storage's use count is back to the pool's own). A worker that finds no free buffer allocates
a new one rather than wait, so a caller who keeps batches cannot stall it.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from dpt_scale.compat import storage_use_count
from dpt_scale.errors import UserError

STACK_BYTES = 2 << 20  # decoded images are stacked into a batch this many bytes at a time
# A batch starts this many bytes into its buffer: simplejpeg decodes faster into memory 16 bytes past
# an aligned boundary (docs/shards.md), and 16 keeps every dtype aligned.
OFFSET = 16


class BatchPool:
    def __init__(self, workers: int, shared: bool, pinned: bool = False, bundle: int = 1):
        """`bundle`: batches per DataLoader item (a worker hands over that many at a time)."""
        self.shared = shared
        # buffers per worker: items being read, prefetched and filled (3 of `bundle` batches),
        # 2 batches held by the caller and a spare
        self.slots = 3 * bundle + 3
        # DataLoader's pin_memory thread copies every tensor it sees out of shared memory: with it,
        # batches travel whole, as the copy lets the buffer go at once.
        self.send_once = shared and not pinned
        self.free = torch.ones(max(workers, 1), self.slots, dtype=torch.uint8)  # 1: the worker may use it
        if shared:
            self.free.share_memory_()
        self._flags = None  # `free` as NumPy sees it (see `flags`)
        self._buffers: dict[int, torch.Tensor] = {}  # worker side: slot -> flat uint8 buffer
        self._views: dict[int, list] = {}  # worker side: slot -> [layout, the buffer so laid out, its images]
        self._sent: dict[int, tuple] = {}  # worker side: slot -> (buffer the main process has, last layout)
        # main side: every buffer received, kept mapped; and the slots received and not yet handed
        # back (once handed back, a slot may already hold the next batch, still on its way here)
        self._mapped: dict[tuple[int, int], torch.UntypedStorage] = {}
        self._outstanding: set[tuple[int, int]] = set()
        self._idle: dict[tuple[int, int], int] = {}  # main side: the owners a slot has when unused
        self._kept: dict[tuple[int, int], torch.Tensor] = {}  # main side: the slot's batch as last laid out

    # ---- worker side

    def take(self, worker: int, shape: tuple[int, ...], dtype: torch.dtype,
             channels_last: bool = False) -> tuple[torch.Tensor, int]:
        """An uninitialised (B, ...) tensor to fill, and its slot (-1: not pooled, nothing to hand
        back). `channels_last` lays a (B, C, H, W) batch out as (B, H, W, C) in memory."""
        layout = (shape, dtype, channels_last)
        flags = self.flags
        for slot in range(self.slots):
            if flags[worker, slot]:
                flags[worker, slot] = 0
                made = self._views.get(slot)
                if made is None or made[0] != layout:  # the slot's buffer shaped as asked, kept
                    nbytes = OFFSET + math.prod(shape) * dtype.itemsize
                    buffer = self._buffers.get(slot)
                    if buffer is None or buffer.numel() != nbytes:
                        buffer = self._buffers[slot] = self._new(nbytes)
                    made = self._views[slot] = [layout, _shaped(buffer, *layout), None]
                # a new alias each time: the caller's batch must be a tensor the pool does not hold
                return made[1].detach(), slot
        return _shaped(self._new(OFFSET + math.prod(shape) * dtype.itemsize), *layout), -1

    def images_hwc(self, slot: int, batch: torch.Tensor) -> list[np.ndarray]:
        """The images of a (B, C, H, W) uint8 batch from `take` as (H, W, C) arrays, the decoders'
        layout. Kept with the slot: making 256 array views costs ~1% of decoding 28 px PNGs."""
        if slot < 0:
            return list(batch.permute(0, 2, 3, 1).numpy())
        made = self._views[slot]
        if made[2] is None:
            made[2] = list(made[1].permute(0, 2, 3, 1).numpy())
        return made[2]

    @property
    def flags(self):
        """`free` through NumPy, made in each process that uses it (a view is not pickled with the
        pool): reading or setting a flag costs 0.1 us instead of torch indexing's 3 us, several
        times a batch on both sides."""
        if self._flags is None:
            self._flags = self.free.numpy()
        return self._flags

    def __getstate__(self) -> dict:
        return self.__dict__ | {"_flags": None}

    def send(self, slot: int, tensor: torch.Tensor) -> torch.Tensor | tuple | None:
        """What goes to the main process for a batch in `slot`: the tensor the first time its
        buffer goes; afterwards its layout (shape, stride, offset, dtype) when that changed, which
        `received` rebuilds it from, else None (as last time)."""
        if not self.send_once or slot < 0:
            return tensor
        layout = tuple(tensor.shape), tuple(tensor.stride()), tensor.storage_offset(), tensor.dtype
        buffer, last = self._sent.get(slot, (None, None))
        self._sent[slot] = self._buffers[slot], layout
        if buffer is not self._buffers[slot]:
            return tensor
        return None if layout == last else layout

    def _new(self, nbytes: int) -> torch.Tensor:
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        return buffer.share_memory_() if self.shared else buffer

    # ---- main side

    def received(self, worker: int, slot: int, sent: torch.Tensor | tuple | None) -> torch.Tensor:
        """The batch tensor for what `send` sent; the buffer counts as in use until handed back."""
        if slot < 0:
            return sent
        if sent is None or isinstance(sent, tuple):
            if sent is not None:  # kept for the batches to come in the same layout
                shape, stride, offset, dtype = sent
                storage = self._mapped[worker, slot]
                self._kept[worker, slot] = torch.empty(0, dtype=dtype).set_(storage, offset, shape, stride)
            tensor = self._kept[worker, slot].detach()  # each batch its own alias (see hand_back)
        elif sent.is_pinned():  # DataLoader's pin_memory thread copied it out and let the buffer go
            self.flags[worker, slot] = 1
            return sent
        else:
            tensor = sent
            if self.shared:
                self._kept[worker, slot], tensor = tensor, tensor.detach()
        storage = self._mapped[worker, slot] = tensor.untyped_storage()
        # The buffer's owners now: the pool's own (its buffer and shaped view in-process; in the
        # main process, `storage` and the kept tensor) and the batch tensor; idle once the batch's
        # are gone.
        self._idle[worker, slot] = storage_use_count(storage) - 1
        self._outstanding.add((worker, slot))
        return tensor

    def hand_back(self) -> None:
        """Free every received buffer that nobody but the pool refers to."""
        for key in list(self._outstanding):
            if storage_use_count(self._mapped[key]) == self._idle[key]:
                self.flags[key] = 1
                self._outstanding.discard(key)


def as_is(batch: dict) -> dict:
    """A DataLoader's collate_fn for batches that carry pooled buffers (with batch_size=None). The
    default would turn the layout that `send` gives into a list, and every array
    into a tensor, which crosses to the main process through a new shared-memory segment per batch
    (an array is pickled with the batch)."""
    return batch


class PooledBatch:
    """Decoded images gathered into a pooled buffer, good ones first; at the end, repeats of them
    fill the places of lost samples. Images are stacked a chunk at a time: stacking costs per call,
    while holding a whole batch of large images before stacking would cost fresh memory every batch. With
    `in_place` (the (C, H, W) of every image), the buffer is taken at once and the caller decodes
    into `hwc[filled]`, counting it in `filled`."""

    def __init__(self, pool: BatchPool, worker: int, size: int, where: Path,
                 in_place: tuple[int, int, int] | None = None):
        self.pool, self.worker, self.size, self.where = pool, worker, size, where
        self.images, self.slot, self.filled, self.chunk = None, -1, 0, 1
        self.stand_in = None  # (label, key, json) of the image standing in for a batch of lost samples
        self.pending: list[torch.Tensor] = []
        self.hwc = None  # in place: the batch's images as (H, W, C) arrays, the decoders' layout
        if in_place:
            self.images, self.slot = pool.take(worker, (size, *in_place), torch.uint8, in_place[0] > 1)
            self.hwc = pool.images_hwc(self.slot, self.images)

    def add(self, image: torch.Tensor) -> None:
        if not self.pending and self.images is None:
            if not isinstance(image, torch.Tensor):
                raise UserError(f"the loader's transform must return a tensor, not {type(image).__name__}")
            self.chunk = max(1, min(self.size, STACK_BYTES // max(1, image.nbytes)))
        self.pending.append(image)
        # in place, an image the decoder could not place is copied at once
        if len(self.pending) >= self.chunk or self.hwc is not None:
            self._flush()

    def extend(self, images: list[torch.Tensor]) -> None:
        self.pending += images
        self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        if self.images is None:
            first = self.pending[0]
            # The decoders give (C, H, W) views of (H, W, C) memory; a batch laid out the same way
            # (channels_last) fills with plain copies instead of transposes.
            hwc = first.dim() == 3 and first.shape[0] > 1 and first.stride(0) == 1
            self.images, self.slot = self.pool.take(self.worker, (self.size, *first.shape), first.dtype, hwc)
        end = self.filled + len(self.pending)
        # stack(out=) would resize a slice of another shape instead of failing: checked first.
        try:
            if self.pending[0].shape != self.images.shape[1:]:
                raise RuntimeError
            torch.stack(self.pending, out=self.images[self.filled:end])
        except RuntimeError:  # (images of different shapes among the pending ones fail in stack)
            shapes = sorted({tuple(image.shape) for image in self.pending} | {tuple(self.images.shape[1:])})
            raise UserError(f"{self.where}: images of different shapes {shapes[:3]} cannot form a batch; "
                            "import with a fixed image size or pass a transform that resizes") from None
        self.filled, self.pending = end, []

    def finish(self) -> torch.Tensor | tuple:
        self._flush()
        for pos in range(self.filled, self.size):  # repeats of good samples stand in for lost ones
            self.images[pos].copy_(self.images[pos - self.filled])
        return self.pool.send(self.slot, self.images)


def _shaped(buffer: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    buffer = buffer[OFFSET:]
    if channels_last:
        b, c, h, w = shape
        return buffer.view(dtype).view(b, h, w, c).permute(0, 3, 1, 2)
    return buffer.view(dtype).view(shape)
