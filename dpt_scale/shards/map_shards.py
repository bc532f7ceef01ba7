"""A model over whole shards: the shared core of pseudo-labelling, encoding, evaluation and feature extraction.

Each rank takes whole shards (shard i goes to rank i % world); DataLoader workers decode them in
the background, whole shards each, while the main process runs the model. Results come back per
shard, in sample order, as soon as a shard is complete, so a caller can write (and a restarted run
skip) one shard at a time. Memory holds only the shards in flight. Batches are decoded into reused
buffers (batchpool.py), as the training loader's are: a fresh one per batch costs page faults on
every batch (at 256 px, about as long as decoding it).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dpt_scale.errors import ShardError, UserError
from dpt_scale.shards.batchpool import BatchPool, as_is
from dpt_scale.shards.decode import (
    BatchDecodeError,
    ImageDecodeError,
    decode_batch_into,
    decode_image,
    decode_images,
    in_place_shape,
)
from dpt_scale.shards.manifest import Manifest
from dpt_scale.shards.rows import END, LABEL, START, shard_rows
from dpt_scale.shards.tar import open_map
from dpt_scale.shards.worker_errors import as_item, raise_if_error


@dataclass
class ShardOutput:
    shard: int  # index in the manifest
    keys: list[str]
    outputs: torch.Tensor  # (N, ...) what `fn` returned for the shard's images, on the CPU
    labels: torch.Tensor | None  # (N,) the shard's own `cls` (-1: none); None when not read


class _ShardBatches(IterableDataset):
    """A shard's batches in sample order, read through the shard's index (rows.py): no tar walk,
    and JPEGs or PNGs of one size decoded straight into the batch, as the training loader does."""

    def __init__(self, directory: Path, manifest: Manifest, shards: list[int], batch_size: int, read_labels: bool,
                 pool: BatchPool):
        self.dir, self.manifest, self.shards, self.batch_size = directory, manifest, shards, batch_size
        self.read_labels, self.pool = read_labels, pool
        self.in_place = in_place_shape(manifest.image)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        try:
            for shard in self.shards[worker::workers]:
                yield from self._shard(shard, worker)
        except (ShardError, UserError) as exc:
            if info is None:
                raise
            yield as_item(exc)

    def _shard(self, shard: int, worker: int) -> Iterator[dict]:
        entry, field = self.manifest.shards[shard], self.manifest.image["field"]
        mm = open_map(str(self.dir / entry.name))[0]
        try:
            # labels={}: the shards' own labels are not wanted, so not even parsed
            rows = shard_rows(self.manifest, self.dir, shard, mm, field, labels=None if self.read_labels else {})
            if rows.bad is not None:
                message = rows.explain(int(np.argmax(rows.bad > 0)))
                raise ShardError(message if "shards verify" in message
                                 else f"{message}; run `dpt-scale shards verify {self.dir}`")
            keys, labels, spans = rows.keys, rows.table[:, LABEL], rows.table[:, START:END + 1].tolist()
            for at in range(0, entry.samples, self.batch_size):
                end = min(at + self.batch_size, entry.samples)
                images, slot = self._images(mm, spans[at:end], keys[at:end], rows.path, worker)
                yield {"shard": shard, "keys": keys[at:end].tolist(), "cls": labels[at:end],
                       "image": self.pool.send(slot, images), "slot": (worker, slot), "last": end == entry.samples}
        finally:
            mm.close()

    def _images(self, mm, spans: list, keys, path: Path, worker: int) -> tuple[torch.Tensor, int]:
        """The batch, in a pooled buffer (taken whole-batch sized, so that a shard's shorter last
        batch reuses it too), and the buffer's slot."""
        if not self.in_place:
            data = [mm[start:end] for start, end in spans]
            try:
                decoded = decode_images(data, self.manifest.image["channels"])
            except ImageDecodeError:  # which one? one by one names it
                decoded = [self._decode(blob, key, path) for blob, key in zip(data, keys)]
            if len({one.shape for one in decoded}) > 1:
                raise ShardError(f"{path}: images of different sizes cannot form a batch; import the set "
                                 "with a fixed --image-size")
            images, slot = self.pool.take(worker, (self.batch_size, *decoded[0].shape), decoded[0].dtype)
            return torch.stack(decoded, out=images[:len(decoded)]), slot
        # (B, H, W, C) memory, as the decoder writes it; a plain layout for one channel is the same
        images, slot = self.pool.take(worker, (self.batch_size, *self.in_place), torch.uint8, self.in_place[0] > 1)
        batch = images[:len(spans)]
        hwc = batch.permute(0, 2, 3, 1).numpy()
        try:
            decode_batch_into([mm[start:end] for start, end in spans], hwc)
        except BatchDecodeError as exc:
            key = keys[exc.index]
            if exc.shape is None:
                raise self._undecodable(key, path, exc) from None
            raise ShardError(f"{path}: sample '{key}' is {exc.shape}, not the manifest's {tuple(batch.shape[1:])}; "
                             f"run `dpt-scale shards verify {self.dir}`") from None
        return batch, slot

    def _decode(self, data: bytes, key: str, path: Path) -> torch.Tensor:
        try:
            return decode_image(data, self.manifest.image["channels"])
        except ImageDecodeError as exc:
            raise self._undecodable(key, path, exc) from None

    def _undecodable(self, key: str, path: Path, exc: Exception) -> ShardError:
        return ShardError(f"{path}: sample '{key}' has no readable .{self.manifest.image['field']} ({exc}); "
                          f"run `dpt-scale shards verify {self.dir}`")


@torch.no_grad()
def map_shards(fn: Callable[[torch.Tensor], torch.Tensor], directory: str | Path, shards: list[int],
               batch_size: int, device: torch.device, workers: int = 2,
               read_labels: bool = False) -> Iterator[ShardOutput]:
    """`fn` (e.g. a classifier's softmax) over the uint8 image batches of the given shards."""
    directory = Path(directory)
    manifest = Manifest.load(directory)
    if manifest.image is None:
        raise ShardError(f"{directory}: this shard set holds no images")
    workers = min(workers, len(shards))
    pinned = device.type == "cuda"
    pool = BatchPool(workers, shared=workers > 0, pinned=pinned)
    data = _ShardBatches(directory, manifest, shards, batch_size, read_labels, pool)
    source = data if workers == 0 else DataLoader(
        data, batch_size=None, num_workers=workers, pin_memory=pinned, collate_fn=as_is)
    partial: dict[int, list[dict]] = {}
    for batch in source:
        raise_if_error(batch)
        images = pool.received(*batch.pop("slot"), batch.pop("image"))
        outputs = fn(images.to(device, non_blocking=True)).cpu()
        del images  # its buffer goes back to the pool, unless `outputs` holds on to it
        pool.hand_back()
        partial.setdefault(batch["shard"], []).append({**batch, "outputs": outputs})
        if batch["last"]:
            parts = partial.pop(batch["shard"])
            yield ShardOutput(batch["shard"], [k for p in parts for k in p["keys"]],
                              torch.cat([p["outputs"] for p in parts]),
                              torch.from_numpy(np.concatenate([p["cls"] for p in parts])) if read_labels else None)
