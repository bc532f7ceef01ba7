"""A model over whole shards: the shared core of pseudo-labelling, evaluation and feature extraction.

Each rank takes whole shards (shard i goes to rank i % world); DataLoader workers decode them in
the background, whole shards each, while the main process runs the model. Results come back per
shard, in sample order, as soon as a shard is complete, so a caller can write (and a restarted run
skip) one shard at a time. Memory holds only the shards in flight.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dpt_scale.errors import ShardError, UserError
from dpt_scale.shards.decode import ImageDecodeError, decode_image
from dpt_scale.shards.manifest import Manifest
from dpt_scale.shards.tar import iter_samples


@dataclass
class ShardOutput:
    shard: int  # index in the manifest
    keys: list[str]
    outputs: torch.Tensor  # (N, ...) what `fn` returned for the shard's images, on the CPU
    labels: torch.Tensor | None  # (N,) the shard's own `cls` (-1: none); None when not read


class _ShardBatches(IterableDataset):
    def __init__(self, directory: Path, manifest: Manifest, shards: list[int], batch_size: int, read_labels: bool):
        self.dir, self.manifest, self.shards, self.batch_size = directory, manifest, shards, batch_size
        self.fields = frozenset({manifest.image["field"]} | ({"cls"} if read_labels else set()))

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        try:
            for shard in self.shards[worker::workers]:
                yield from self._shard(shard)
        except (ShardError, UserError) as exc:
            if info is None:
                raise
            yield {"error": str(exc)}  # one line for the user, not a worker traceback

    def _shard(self, shard: int) -> Iterator[dict]:
        entry, field = self.manifest.shards[shard], self.manifest.image["field"]
        path = self.dir / entry.name
        images, keys, labels, seen = [], [], [], 0
        for sample in iter_samples(path, fields=self.fields):
            seen += 1
            try:
                images.append(decode_image(sample[field], self.manifest.image["channels"]))
            except (KeyError, ImageDecodeError) as exc:
                raise ShardError(f"{path}: sample '{sample['__key__']}' has no readable .{field} ({exc}); "
                                 f"run `dpt-scale shards verify {self.dir}`") from None
            keys.append(sample["__key__"])
            labels.append(int(sample["cls"]) if "cls" in sample else -1)
            if len(images) == self.batch_size or seen == entry.samples:
                yield {"shard": shard, "keys": keys, "image": torch.stack(images), "cls": torch.tensor(labels),
                       "last": seen == entry.samples}
                images, keys, labels = [], [], []
        if seen != entry.samples:
            raise ShardError(f"{path}: holds {seen} samples but the manifest lists {entry.samples}; "
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
    data = _ShardBatches(directory, manifest, shards, batch_size, read_labels)
    source = data if workers == 0 or not shards else DataLoader(
        data, batch_size=None, num_workers=min(workers, len(shards)), pin_memory=device.type == "cuda")
    partial: dict[int, list[dict]] = {}
    for batch in source:
        if "error" in batch:
            raise ShardError(batch["error"])
        outputs = fn(batch["image"].to(device, non_blocking=True)).cpu()
        partial.setdefault(batch["shard"], []).append({**batch, "outputs": outputs})
        if batch["last"]:
            parts = partial.pop(batch["shard"])
            yield ShardOutput(batch["shard"], [k for p in parts for k in p["keys"]],
                              torch.cat([p["outputs"] for p in parts]),
                              torch.cat([p["cls"] for p in parts]) if read_labels else None)
