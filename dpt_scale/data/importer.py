"""`dpt-scale data import`: a source -> ROOT/train and ROOT/val shard sets with manifests.

Images are decoded and encoded in worker processes and written in a fixed, shuffled order (so
that every shard mixes all classes); the keys stay those of the source. An unreadable image is
reported with its path, skipped, counted in the manifest and listed in SPLIT/unreadable.txt.
"""
from __future__ import annotations

import hashlib
import logging
import multiprocessing
import random
import re
import time
from contextlib import nullcontext
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

from tqdm import tqdm

import dpt_scale
from dpt_scale.data.images import EncodeSettings, Unreadable, encode_array, encode_file
from dpt_scale.data.sources import SOURCES, Source
from dpt_scale.errors import UserError
from dpt_scale.recipe.schema import Recipe
from dpt_scale.shards.manifest import MANIFEST, Manifest
from dpt_scale.shards.writer import ShardSetWriter

log = logging.getLogger(__name__)
UNREADABLE_LIST = "unreadable.txt"


def import_data(recipe: Recipe, force: bool = False) -> dict[str, Manifest]:
    cfg = recipe.data
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
        out = Path(recipe.data_root) / split
        manifests[split] = _existing(out, split, identity, force) or \
            _write_split(out, split, items, source, settings, identity, cfg.import_workers)
    if "val" not in splits:
        log.warning(f"{cfg.source} source gave no validation images: only {Path(recipe.data_root) / 'train'} was "
                    "written (name a val tree with --val, or hold some out with --val-fraction)")
    return manifests


def _hold_out(items: list[tuple], fraction: float) -> dict[str, list[tuple]]:
    """Split by a hash of the key: stable whatever the import order or the other images."""
    def in_val(key: str) -> bool:
        return int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) < fraction * 2**32
    return {"train": [it for it in items if not in_val(it[0])], "val": [it for it in items if in_val(it[0])]}


def _existing(out: Path, split: str, identity: dict, force: bool) -> Manifest | None:
    """A complete set made with the same settings is reused; anything else of ours is cleared."""
    if not out.exists():
        return None
    ours = re.compile(rf"{split}-\d+\.tar(\.tmp)?|{MANIFEST}(\.tmp)?|{UNREADABLE_LIST}")
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
    order = list(items)
    random.Random(f"import:{identity['seed']}:{split}").shuffle(order)
    encode = partial(encode_array if source.kind == "array" else encode_file, s=settings)
    meta = {"source": identity["source"], "import": identity, "split": split, "dpt_scale": dpt_scale.__version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    unreadable = []
    start = time.perf_counter()
    pool = multiprocessing.Pool(workers) if workers > 1 else nullcontext()
    with pool, ShardSetWriter(out, classes=source.classes, prefix=split, max_samples=identity["shard_samples"],
                              max_bytes=identity["shard_bytes"], image_field=settings.format, meta=meta) as writer:
        results = pool.imap(encode, order, chunksize=256 if source.kind == "array" else 16) if workers > 1 \
            else map(encode, order)
        for result in tqdm(results, total=len(order), desc=f"import {split}", unit="img", disable=None,
                           mininterval=2):
            if isinstance(result, Unreadable):
                log.warning(f"skipped unreadable image {result.source}: {result.reason}")
                unreadable.append(result)
                continue
            writer.write({"__key__": result.key, settings.format: result.data, "cls": result.label}, result.shape)
        if len(unreadable) == len(order):
            raise UserError(f"no readable image in the {split} split of the source; nothing was imported")
        meta["unreadable"] = len(unreadable)
    manifest = writer.manifest
    if unreadable:
        (out / UNREADABLE_LIST).write_text("".join(f"{u.source}\t{u.reason}\n" for u in unreadable))
    elapsed = time.perf_counter() - start
    skipped = f"; {len(unreadable)} unreadable image(s) skipped, listed in {out / UNREADABLE_LIST}" if unreadable else ""
    print(f"{out}: {manifest.num_samples} images in {len(manifest.shards)} shard(s), "
          f"{manifest.num_bytes / 2**20:.1f} MiB, {manifest.num_samples / elapsed:.0f} images/s{skipped}")
    return manifest
