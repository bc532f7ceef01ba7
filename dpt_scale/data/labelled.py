"""The labelled subset in memory, and the step-indexed batches stage 1 draws from it.

Only the subset's samples are read: a first walk over each shard lists keys (no member is
copied), then the image and `cls` of each listed key are read by seeking to it. The labels of all
other images are never touched, which is what lets the hidden-label test pass bit for bit.

The subset is small (a few images per class: 40 for MNIST at 4 per class, 5,000 for ImageNet at 5
per class), so it is held decoded; a batch is a function of (seed, batch number, rank) alone,
which makes resume exact without saving any loader state.
"""
from __future__ import annotations

import functools
import logging
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from dpt_scale.data.subset import read_list, shown
from dpt_scale.errors import ShardError, UserError
from dpt_scale.shards.decode import ImageDecodeError, decode_image
from dpt_scale.shards.index import parse_label
from dpt_scale.shards.manifest import Manifest
from dpt_scale.shards.tar import TarFormatError, iter_samples

log = logging.getLogger(__name__)


class LabelledBank:
    def __init__(self, images: torch.Tensor, labels: torch.Tensor, keys: list[str], classes: list[str]):
        self.images, self.labels, self.keys, self.classes = images, labels, keys, classes

    @classmethod
    def from_subset(cls, shard_dir: str | Path, subset_file: str | Path, on_corrupt: str = "error") -> "LabelledBank":
        """With on_corrupt="skip" a damaged shard is read up to the damage (the unlabelled stream skips
        the rest); a labelled image lost in it is still an error: the subset is the whole supervision."""
        shard_dir = Path(shard_dir)
        wanted = set(read_list(subset_file))
        manifest = Manifest.load(shard_dir)
        field, found, damaged = manifest.image["field"], {}, []
        for entry in manifest.shards:
            path = shard_dir / entry.name
            hits = []
            try:
                for i, s in enumerate(iter_samples(path, fields=frozenset())):
                    if s["__key__"] in wanted:
                        hits.append((i, s["__key__"], s["__offset__"]))
            except TarFormatError as exc:
                if on_corrupt != "skip":
                    raise
                damaged.append(f"{exc}")
            for i, key, offset in hits:
                sample = next(iter_samples(path, i, i + 1, fields=frozenset({field, "cls"}), seek=(i, offset)))
                if "cls" not in sample:
                    raise UserError(f"labelled key {key} has no label in {path}; the subset must name labelled images")
                try:
                    image = decode_image(sample[field], manifest.image["channels"]).contiguous()
                except (KeyError, ImageDecodeError) as exc:
                    problem = f"has no .{field} member" if isinstance(exc, KeyError) else f"does not decode ({exc})"
                    raise ShardError(f"{path}: labelled sample '{key}' {problem}; run `dpt-scale shards verify "
                                     f"{shard_dir}`, then restore or re-import the set") from None
                label = parse_label(sample["cls"])
                if not 0 <= label < manifest.num_classes:
                    raise ShardError(f"{path}: member '{key}.cls' is not a class index below {manifest.num_classes}; "
                                     f"run `dpt-scale shards verify {shard_dir}`, then restore or re-import the set")
                found[key] = (image, label)
        missing = sorted(wanted - found.keys())
        if missing and damaged:
            raise ShardError(f"{len(missing)} labelled image(s), e.g. {missing[0]}, may be in damaged shards "
                             f"({damaged[0]}); restore or re-import {shard_dir}")
        if damaged:
            log.warning(f"{shard_dir}: {len(damaged)} damaged shard(s) read up to the damage while finding the "
                        f"labelled images, none of which was lost (on_corrupt=skip): {damaged[0]}")
        if missing:
            raise UserError(f"{subset_file}: {len(missing)} key(s) are not in {shard_dir}, e.g. {shown(missing)}; "
                            "make the subset from this shard set (`dpt-scale data subset`)")
        keys = sorted(found)
        try:
            images = torch.stack([found[k][0] for k in keys])
        except RuntimeError:
            raise ShardError(f"{shard_dir}: the labelled images differ in size; import with --image-size") from None
        labels = torch.tensor([found[k][1] for k in keys])
        return cls(images, labels, keys, manifest.classes)

    def __len__(self) -> int:
        return len(self.keys)

    def batch(self, n: int, batch_size: int, rank: int, world: int, seed: int,
              transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict:
        """Batch number n of this rank: the subset is dealt out in shuffled passes, the ranks taking
        consecutive runs of `batch_size`; the transform is seeded by (seed, n, rank)."""
        first = (n * world + rank) * batch_size
        picks = [_pass_order(len(self), seed, p // len(self))[p % len(self)] for p in range(first, first + batch_size)]
        images = self.images[picks]
        if transform is not None:
            state = random.getstate(), torch.get_rng_state()
            random.seed(f"labelled:{seed}:{n}:{rank}")
            torch.manual_seed(random.getrandbits(63))
            images = torch.stack([transform(im) for im in images])
            random.setstate(state[0])
            torch.set_rng_state(state[1])
        return {"image": images, "cls": self.labels[picks], "key": [self.keys[i] for i in picks]}

    def batches(self, start: int, batch_size: int, rank: int, world: int, seed: int,
                transform=None) -> Iterator[dict]:
        n = start
        while True:
            yield self.batch(n, batch_size, rank, world, seed, transform)
            n += 1


@functools.lru_cache(maxsize=4)
def _pass_order(size: int, seed: int, number: int) -> tuple[int, ...]:
    """The order of the subset's pass `number`: a fresh shuffle per pass."""
    order = list(range(size))
    random.Random(f"labelled-order:{seed}:{number}").shuffle(order)
    return tuple(order)
