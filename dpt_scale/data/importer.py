"""`dpt-scale data import`: a source -> ROOT/train and ROOT/val shard sets with manifests.

The items are put in a seeded, shuffled order (so that every shard mixes all classes; the keys stay
those of the source) and cut into groups of `shard_samples`; worker processes decode, encode and
write one group each as a shard, and the main process merges their statistics into the manifest.
An unreadable image is reported with its path, skipped, counted in the manifest and listed in
SPLIT/unreadable.txt.
"""
from __future__ import annotations

import hashlib
import logging
import random
import re
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

import dpt_scale
from dpt_scale.data.images import EncodeSettings, Unreadable, encode_array, encode_file
from dpt_scale.data.sources import SOURCES, Source
from dpt_scale.errors import UserError, check_writable
from dpt_scale.layout import layout
from dpt_scale.recipe.schema import Recipe
from dpt_scale.shards.manifest import MANIFEST, Manifest
from dpt_scale.shards.writer import SetStats, ShardSetWriter

log = logging.getLogger(__name__)
UNREADABLE_LIST = "unreadable.txt"


def import_data(recipe: Recipe, force: bool = False) -> dict[str, Manifest]:
    cfg = recipe.data
    check_writable(recipe.data_root, "pass --out DIR (data.root)")
    source = SOURCES[cfg.source](cfg)
    for note in source.notes:
        log.warning(note)
    splits = dict(source.splits)
    if cfg.val_fraction > 0:
        if "val" in splits:
            log.warning(f"val_fraction {cfg.val_fraction} ignored: the {cfg.source} source has a validation split")
        else:
            splits = _hold_out(splits["train"], cfg.val_fraction)
    settings = EncodeSettings(cfg.format, cfg.channels or source.channels, cfg.image_size, cfg.quality)
    identity = {
        "source": cfg.source, "paths": [str(Path(p).resolve()) for p in cfg.paths],
        "val_paths": [str(Path(p).resolve()) for p in cfg.val_paths], "val_fraction": cfg.val_fraction,
        "image_size": cfg.image_size, "channels": settings.channels, "format": cfg.format,
        "quality": cfg.quality, "shard_samples": cfg.shard_samples, "shard_bytes": cfg.shard_bytes,
        "seed": cfg.seed,
    }
    manifests = {}
    for split, items in splits.items():
        out = getattr(layout(recipe), split)
        manifests[split] = _existing(out, split, identity, force) or \
            _write_split(out, split, items, source, settings, identity, cfg.import_workers)
    if "val" not in splits:
        log.warning(f"{cfg.source} source gave no validation images: only {layout(recipe).train} was "
                    "written (name a val tree with --val, or hold some out with --val-fraction)")
    return manifests


def check_settings(recipe: Recipe, directory: Path, manifest: Manifest) -> None:
    """A stage reading <data.root>/SPLIT gets the images the recipe's import settings describe
    (data.channels and data.image_size, where the recipe sets them), or stops: a data root shared with,
    or imported by, another recipe would otherwise train a model of another shape without a word."""
    image, cfg = manifest.image, recipe.data
    if image is None:  # no images at all: the stage's own check names that
        return
    differ = []
    if cfg.channels is not None and cfg.channels != image["channels"]:
        differ.append(f"data.channels: {cfg.channels} but the images are {image['channels']}-channel")
    if cfg.image_size is not None and image["size"] != [cfg.image_size] * 2:
        size = "x".join(map(str, image["size"])) if image["size"] else "of several sizes"
        differ.append(f"data.image_size: {cfg.image_size} but the images are {size}")
    if differ:
        raise UserError(f"{directory} does not hold the images the recipe describes ({'; '.join(differ)}); "
                        "re-import with `dpt-scale data import --recipe RECIPE --force`, or change the recipe")


def _hold_out(items: list[tuple], fraction: float) -> dict[str, list[tuple]]:
    """Split by a hash of the key: stable whatever the import order or the other images."""
    def in_val(key: str) -> bool:
        return int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) < fraction * 2**32
    return {"train": [it for it in items if not in_val(it[0])], "val": [it for it in items if in_val(it[0])]}


def _existing(out: Path, split: str, identity: dict, force: bool) -> Manifest | None:
    """A complete set made with the same settings is reused; anything else of ours is cleared."""
    if not out.exists():
        return None
    ours = re.compile(rf"{split}-\d+(-\d+)?\.tar(\.tmp)?|{MANIFEST}(\.tmp)?|{UNREADABLE_LIST}")
    foreign = [p.name for p in out.iterdir() if not ours.fullmatch(p.name)]
    if foreign:
        raise UserError(f"{out} exists and holds files this import did not make ({', '.join(foreign[:3])}); "
                        "choose another --out")
    if (out / MANIFEST).exists() and not force:
        manifest = Manifest.load(out)
        old = manifest.meta.get("import", {})
        if old == identity:
            print(f"{out}: already imported with the same settings ({manifest.num_samples} images); kept")
            return manifest
        changed = [k for k in identity if old.get(k) != identity[k]]
        raise UserError(f"{out} already holds a shard set imported with other settings ({', '.join(changed)} "
                        "differ); pass --force to replace it, or choose another --out")
    (out / MANIFEST).unlink(missing_ok=True)  # first, so that no reader sees a half-replaced set
    for path in out.iterdir():
        path.unlink()
    return None


def _write_split(out: Path, split: str, items: list[tuple], source: Source, settings: EncodeSettings,
                 identity: dict, workers: int) -> Manifest:
    """Shard k holds the k-th group of `shard_samples` items of a seeded shuffle; each group is
    encoded and written by one worker (the main process only merges the statistics), so the shards
    are the same for any number of workers and writing is not serialised through one process."""
    order = list(items)
    random.Random(f"import:{identity['seed']}:{split}").shuffle(order)
    size = identity["shard_samples"]
    tasks = [_Group(out, split, k, order[i:i + size], source.kind, settings, identity["shard_bytes"], source.classes)
             for k, i in enumerate(range(0, len(order), size))]
    out.mkdir(parents=True, exist_ok=True)
    entries, stats, unreadable = [], SetStats([0] * len(source.classes)), []
    start = time.perf_counter()
    with tqdm(total=len(order), desc=f"import {split}", unit="img", disable=None, mininterval=2) as progress:
        for group, (group_entries, group_stats, group_unreadable) in zip(tasks, _written(tasks, workers)):
            for u in group_unreadable:
                log.warning(f"skipped unreadable image {u.source}: {u.reason}")
            entries += group_entries
            stats.merge(group_stats)
            unreadable += group_unreadable
            progress.update(len(group.items))
    if len(unreadable) == len(order):
        raise UserError(f"no readable image in the {split} split of the source; nothing was imported")
    if unreadable:
        (out / UNREADABLE_LIST).write_text("".join(f"{u.source}\t{u.reason}\n" for u in unreadable))
    meta = {"source": identity["source"], "import": identity, "split": split, "unreadable": len(unreadable),
            "dpt_scale": dpt_scale.__version__, "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    manifest = stats.manifest(entries, source.classes, settings.format, meta)
    manifest.save(out)
    elapsed = time.perf_counter() - start
    skipped = (f"; {len(unreadable)} unreadable image(s) skipped, listed in {out / UNREADABLE_LIST}"
               if unreadable else "")
    print(f"{out}: {manifest.num_samples} images in {len(manifest.shards)} shard(s), "
          f"{manifest.num_bytes / 2**20:.1f} MiB, {manifest.num_samples / elapsed:.0f} images/s{skipped}")
    return manifest


def _written(tasks: list[_Group], workers: int) -> Iterator[tuple[list, SetStats, list[Unreadable]]]:
    """_write_group of each task, in order, by `workers` processes. At most two groups per worker are
    in flight; an error cancels the queued ones and waits for the running ones (on a full disk they
    fail at their next write too). Not multiprocessing.Pool: its terminate() can hang for good when
    its task thread is blocked sending a group into a full pipe, which is what a full disk led to."""
    if workers == 1:
        yield from map(_write_group, tasks)
        return
    with ProcessPoolExecutor(workers) as pool:
        in_flight = deque()
        try:
            for task in tasks:
                in_flight.append(pool.submit(_write_group, task))
                if len(in_flight) == 2 * workers:
                    yield in_flight.popleft().result()
            while in_flight:
                yield in_flight.popleft().result()
        finally:
            for future in in_flight:
                future.cancel()


@dataclass
class _Group:
    out: Path
    split: str
    index: int
    items: list[tuple]
    kind: str
    settings: EncodeSettings
    max_bytes: int
    classes: list[str]

    def shard_name(self, part: int) -> str:
        """SPLIT-00000k.tar; a group over the byte limit continues in SPLIT-00000k-1.tar, ..."""
        return f"{self.split}-{self.index:06d}" + (f"-{part}" if part else "") + ".tar"


def _write_group(group: _Group) -> tuple[list, SetStats, list[Unreadable]]:
    """In a worker: encode one group and write its shard(s), without a manifest."""
    encode = encode_array if group.kind == "array" else encode_file
    unreadable = []
    with ShardSetWriter(group.out, classes=group.classes, max_samples=len(group.items), max_bytes=group.max_bytes,
                        image_field=group.settings.format, name=group.shard_name, save_manifest=False) as writer:
        for item in group.items:
            result = encode(item, group.settings)
            if isinstance(result, Unreadable):
                unreadable.append(result)
            else:
                writer.write({"__key__": result.key, group.settings.format: result.data, "cls": result.label},
                             result.shape)
    return writer.entries, writer.stats, unreadable
