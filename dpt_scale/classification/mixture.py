"""Several batch sources advanced together, one batch of each per training step.

Stage 1 and 4 draw every step from the labelled subset (in memory), from pseudo-image shard sets
(stage 4) and from the unlabelled training shards (FixMatch). Each source is indexed by the
global batch number g, so resuming at g needs no saved loader state. To the Trainer a Mixture
looks like one loader: `batch_size` and `batches(epoch, offset)`, with `per_epoch` batches per
(nominal) epoch.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from dpt_scale.data.labelled import LabelledBank
from dpt_scale.shards.loader import ShardLoader


class BankSource:
    def __init__(self, bank: LabelledBank, batch_size: int, rank: int, world: int, seed: int,
                 transform: Callable | None = None):
        self.bank, self.batch_size, self.args = bank, batch_size, (rank, world, seed, transform)

    def stream(self, g: int) -> Iterator[dict]:
        return self.bank.batches(g, self.batch_size, *self.args)


class ShardSource:
    def __init__(self, loader: ShardLoader):
        self.loader = loader

    def stream(self, g: int) -> Iterator[dict]:
        n = len(self.loader)
        return self.loader.batches(g // n, g % n * self.loader.batch_size)


class Mixture:
    def __init__(self, sources: dict[str, BankSource | ShardSource], batch_size: int, per_epoch: int):
        self.sources, self.batch_size, self.per_epoch = sources, batch_size, per_epoch

    def batches(self, epoch: int = 0, offset: int = 0) -> Iterator[dict]:
        g = epoch * self.per_epoch + offset // self.batch_size
        streams = {name: source.stream(g) for name, source in self.sources.items()}
        try:
            while True:
                batch = {name: next(stream) for name, stream in streams.items()}
                batch.update(epoch=g // self.per_epoch, index=g % self.per_epoch)
                yield batch
                g += 1
        finally:
            for stream in streams.values():
                if hasattr(stream, "close"):
                    stream.close()


def labelled_part(batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and labels of every labelled source of a mixed batch (real and pseudo), joined."""
    parts = [batch[name] for name in sorted(batch) if name == "labelled" or name.startswith("pseudo")]
    images = torch.cat([p["image"].to(device, non_blocking=True) for p in parts])
    labels = torch.cat([p["cls"] for p in parts]).to(device)
    return images, labels
