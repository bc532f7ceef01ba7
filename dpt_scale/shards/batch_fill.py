"""One batch's samples decoded into its pooled buffer, by the loader's settings: all at once where
every sample is sound (the usual case), else one by one, lost ones left out and damaged ones
reported or skipped by `on_corrupt`; a batch with no readable sample gets the set's first one.
Transforms run under a seed of the batch's own, so a resumed run repeats the augmentations."""
from __future__ import annotations

import json
import logging
import random
from contextlib import contextmanager, nullcontext

import numpy as np
import torch

from dpt_scale.errors import ShardError
from dpt_scale.shards.batchpool import PooledBatch
from dpt_scale.shards.decode import ImageDecodeError, decode_all_into, decode_image, decode_images, decode_into
from dpt_scale.shards.index import BAD_LABEL, load_npy, parse_label
from dpt_scale.shards.rows import END, SHARD, START
from dpt_scale.shards.shard_cache import ShardCache
from dpt_scale.shards.tar import iter_samples

log = logging.getLogger(__name__)


class BatchFiller:
    def __init__(self, loader, shards: ShardCache):
        self.ld, self.shards = loader, shards  # the ShardLoader, for its settings; its open shards

    def fill(self, batch: PooledBatch, table: np.ndarray, keys: np.ndarray, sound: bool, seed: int | None) -> list[int]:
        """The positions in `table` of the samples now in `batch` (empty: the stand-in is)."""
        with _seeded(seed) if self.ld.transform else nullcontext():
            good = self._fill_fast(batch, table) if sound else None
        if good is None:  # a lost or damaged sample, or an image for the other decoder: one at a time
            batch.filled, batch.pending = 0, []
            with _seeded(seed) if self.ld.transform else nullcontext():
                good = self._fill(batch, table, keys)
        return good

    def _fill_fast(self, batch: PooledBatch, table: np.ndarray) -> list[int] | None:
        """The usual case, every sample sound, with no Python work per sample besides decoding (list
        comprehensions over whole chunks); None at the first exception to the rule."""
        shards = table[:, SHARD].tolist()
        maps = self.shards.maps(shards)
        data = [maps[s][a:b] for s, a, b in zip(shards, table[:, START].tolist(), table[:, END].tolist())]
        if batch.hwc is not None:  # images decoded straight into the batch
            if not decode_all_into(data, batch.hwc):
                return None
            batch.filled = len(data)
            return list(range(len(data)))
        channels, plain = self.ld.channels, self.ld.channels is not None and self.ld.transform is None
        try:
            batch.add(self._decode(data[0]))  # fixes the chunk size
            for at in range(1, len(data), batch.chunk):
                chunk = data[at:at + batch.chunk]
                batch.extend(decode_images(chunk, channels) if plain else [self._decode(d) for d in chunk])
        except ImageDecodeError:
            return None
        return list(range(len(data)))

    def _fill(self, batch: PooledBatch, table: np.ndarray, keys: np.ndarray) -> list[int]:
        """Sample by sample: lost ones skipped, damaged ones reported (or skipped, by the policy)."""
        ld, hwc, good = self.ld, batch.hwc, []
        maps = self.shards.maps(s for s in table[:, SHARD].tolist() if s >= 0)
        for p, (shard, start, end) in enumerate(table[:, [SHARD, START, END]].tolist()):
            if shard < 0:
                continue
            data = maps[shard][start:end]
            try:
                if hwc is not None and decode_into(data, hwc[len(good)]):
                    batch.filled += 1
                else:
                    batch.add(self._decode(data))
            except ImageDecodeError as exc:
                message = (f"{ld.dir / ld.manifest.shards[shard].name}: member "
                           f"'{keys[p]}.{ld.field}' does not decode ({exc})")
                if ld.on_corrupt == "error":
                    raise ShardError(message) from None
                log.warning(f"skipping a damaged sample: {message}")
                continue
            good.append(p)
        if not good:
            image, batch.stand_in = self._first_readable()
            batch.add(image)
        return good

    def _decode(self, data: bytes) -> torch.Tensor:
        """The sample's image (or array), transformed."""
        image = _load_array(data) if self.ld.channels is None else decode_image(data, self.ld.channels)
        return image if self.ld.transform is None else self.ld.transform(image)

    def _first_readable(self) -> tuple:
        """Stand-in for a batch with no readable sample: the first good sample of the set, as
        (image, (label, key, json)). (Not the last good one this worker saw: a batch must depend
        only on the plan, or resume would differ.)"""
        ld = self.ld
        for entry in ld.manifest.shards:
            try:
                for sample in iter_samples(ld.dir / entry.name, fields=ld.fields):
                    key = sample["__key__"]
                    label = ld.labels.get(key, -1) if ld.labels is not None else parse_label(sample.get("cls"))
                    if ld.field not in sample or label == BAD_LABEL:
                        continue
                    try:
                        image = self._decode(sample[ld.field])
                    except ImageDecodeError:
                        continue
                    return image, (label, key, json.loads(sample["json"]) if "json" in sample else None)
            except ShardError:
                continue
        raise ShardError(f"{ld.dir}: not one sample of the set is readable; run `dpt-scale shards verify`")


def _load_array(data: bytes) -> torch.Tensor:
    """A `.npy` member as a tensor of its stored dtype (damage raises the loader's 'does not decode')."""
    try:
        return torch.from_numpy(load_npy(data).copy())  # copy: np.load's is read-only
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
