"""`dpt-scale data import`: a source -> ROOT/train and ROOT/val shard sets with manifests.

Images (arrays, files) are put in a seeded, shuffled order (so that every shard mixes all classes;
the keys stay those of the source) and cut into groups of `shard_samples`; a source of shards
(webdataset) gives one group per input shard, its samples in their order. Worker processes
decode, encode and write one group each as shard(s), and the main process merges their statistics
into the manifest. A finished group leaves a record beside its shards, so that an import stopped
by a kill, a full disk or a bad input, run again, keeps the groups it finished and redoes the rest.
An unreadable image is reported with its path, skipped, counted in the manifest and listed in
SPLIT/unreadable.txt.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import mmap
import random
import re
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from tqdm import tqdm

import dpt_scale
from dpt_scale.data.images import Encoded, EncodeSettings, Unreadable, encode_array, encode_bytes, encode_file
from dpt_scale.data.sources import SOURCES, Source
from dpt_scale.errors import UserError, check_writable
from dpt_scale.layout import layout
from dpt_scale.recipe.schema import Recipe
from dpt_scale.shards.index import read_index
from dpt_scale.shards.manifest import MANIFEST, Manifest, ShardEntry, write_json
from dpt_scale.shards.writer import SetStats, ShardSetWriter

log = logging.getLogger(__name__)
UNREADABLE_LIST = "unreadable.txt"
RECORD_SUFFIX = ".done"  # SPLIT-00000k.done: group k is finished (its shards, statistics, unreadable images)


def import_data(recipe: Recipe, force: bool = False) -> dict[str, Manifest]:
    cfg = recipe.data
    check_writable(recipe.data_root, "pass --out DIR (data.root)")
    source = SOURCES[cfg.source](cfg)
    for note in source.notes:
        log.warning(note)
    splits, hold_out = dict(source.splits), None
    if cfg.val_fraction > 0:
        if "val" in splits:
            log.warning(f"val_fraction {cfg.val_fraction} ignored: the {cfg.source} source has a validation split")
        elif source.kind == "shards":  # the samples are known only once read: held out as they are
            splits["val"], hold_out = splits["train"], cfg.val_fraction
        else:
            splits = _hold_out(splits["train"], cfg.val_fraction)
    settings = EncodeSettings(cfg.format, cfg.channels or source.channels, cfg.image_size, cfg.quality)
    identity = {
        "source": cfg.source, "paths": [_resolved(p) for p in cfg.paths],
        "val_paths": [_resolved(p) for p in cfg.val_paths], "val_fraction": cfg.val_fraction,
        "image_size": cfg.image_size, "channels": settings.channels, "format": cfg.format,
        "quality": cfg.quality, "shard_samples": cfg.shard_samples, "shard_bytes": cfg.shard_bytes,
        "seed": cfg.seed, **source.settings,
    }
    manifests, written = {}, {}
    for split, items in splits.items():
        out = getattr(layout(recipe), split)
        kept = _existing(out, split, identity, force)
        if kept is not None:
            manifests[split] = kept
        else:
            written[split] = _write_split(out, split, items, source, settings, identity, cfg.import_workers, hold_out)
    classes = _class_names(source, manifests, written)
    for split, result in written.items():  # manifests last: both splits get the same classes
        manifests[split] = result.save(classes, settings.format, identity)
    if "val" not in splits:
        log.warning(f"{cfg.source} source gave no validation images: only {layout(recipe).train} was "
                    "written (name validation inputs with --val, or hold some out with --val-fraction)")
    return {split: manifests[split] for split in splits}


def _resolved(path: str) -> str:
    """A local path made absolute (the same inputs named from another folder are the same import);
    URLs and pipe: commands as they are."""
    return path if re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", path) else str(Path(path).resolve())


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


def in_val(key: str, fraction: float) -> bool:
    """Held out by a hash of the key: stable whatever the import order or the other images."""
    return int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) < fraction * 2**32


def _hold_out(items: list[tuple], fraction: float) -> dict[str, list[tuple]]:
    return {"train": [it for it in items if not in_val(it[0], fraction)],
            "val": [it for it in items if in_val(it[0], fraction)]}


def _in_split(key: str, fraction: float, val: bool) -> bool:
    return in_val(key, fraction) == val


def _existing(out: Path, split: str, identity: dict, force: bool) -> Manifest | None:
    """A complete set made with the same settings is reused; with `force` anything else of ours is
    cleared (without, an unfinished import's groups are left for _write_split to resume)."""
    if not out.exists():
        return None
    ours = re.compile(rf"{split}-\d+(-\d+)?\.tar(\.tmp)?|{split}-\d+{re.escape(RECORD_SUFFIX)}(\.tmp)?|"
                      rf"{MANIFEST}(\.tmp)?|{UNREADABLE_LIST}")
    foreign = [p.name for p in out.iterdir() if not ours.fullmatch(p.name)]
    if foreign:
        raise UserError(f"{out} exists and holds files this import did not make ({', '.join(foreign[:3])}); "
                        "choose another --out")
    if (out / MANIFEST).exists() and not force:
        manifest = Manifest.load(out)
        old = manifest.meta.get("import", {})
        if old == identity:
            for record in out.glob(f"*{RECORD_SUFFIX}"):  # left by a run stopped right after its manifest
                record.unlink()
            print(f"{out}: already imported with the same settings ({manifest.num_samples} images); kept")
            return manifest
        changed = [k for k in identity if old.get(k) != identity[k]]
        raise UserError(f"{out} already holds a shard set imported with other settings ({', '.join(changed)} "
                        "differ); pass --force to replace it, or choose another --out")
    (out / MANIFEST).unlink(missing_ok=True)  # first, so that no reader sees a half-replaced set
    if force:
        for path in out.iterdir():
            path.unlink()
    return None


def _write_split(out: Path, split: str, items: list[tuple], source: Source, settings: EncodeSettings,
                 identity: dict, workers: int, hold_out: float | None) -> _Split:
    """Each group is encoded and written by one worker (the main process only merges the
    statistics), so the shards are the same for any number of workers and writing is not
    serialised through one process. Groups an earlier run finished are kept."""
    tasks = _tasks(out, split, items, source, settings, identity, hold_out)
    out.mkdir(parents=True, exist_ok=True)
    results = _kept(out, tasks)
    todo = [task for task in tasks if task.index not in results]
    start = time.perf_counter()
    total, unit = (len(todo), "shard") if source.kind == "shards" else (sum(len(t.items) for t in todo), "img")
    with tqdm(total=total, desc=f"import {split}", unit=unit, disable=None, mininterval=2) as progress:
        for task, result in zip(todo, _written(todo, workers)):
            for u in result.unreadable:
                log.warning(f"skipped unreadable image {u.source}: {u.reason}")
            results[task.index] = result
            progress.update(1 if source.kind == "shards" else len(task.items))
    merged = _Split(out, split, [], SetStats([0] * len(source.classes)) if source.classes is not None
                    else SetStats([], grows=True), [], time.perf_counter() - start, len(todo))
    for task in tasks:
        merged.entries += results[task.index].entries
        merged.stats.merge(results[task.index].stats)
        merged.unreadable += results[task.index].unreadable
    if not merged.entries and (merged.unreadable or source.kind != "shards"):
        raise UserError(f"no readable image in the {split} split of the source; nothing was imported")
    if source.kind == "shards":
        _check_shards(tasks, results, hold_out)
    return merged


def _tasks(out: Path, split: str, items: list[tuple], source: Source, settings: EncodeSettings, identity: dict,
           hold_out: float | None) -> list[_Group]:
    """Group k: the k-th `shard_samples` items of a seeded shuffle, or the samples of input shard k."""
    if source.kind == "shards":
        groups = [[item] for item in items]
    else:
        order = list(items)
        random.Random(f"import:{identity['seed']}:{split}").shuffle(order)
        size = identity["shard_samples"]
        groups = [order[i:i + size] for i in range(0, len(order), size)]
    keep = None if hold_out is None else functools.partial(_in_split, fraction=hold_out, val=split == "val")
    # An input shard's group is known by its URL (and a local file's version), so a URL list changed
    # elsewhere, e.g. one bad URL corrected, keeps the other groups.
    settings_of = {k: v for k, v in identity.items() if k not in ("paths", "val_paths")} \
        if source.kind == "shards" else identity
    return [_Group(out, split, k, group, source.kind, settings, identity["shard_samples"], identity["shard_bytes"],
                   source.classes, source.read, keep, settings_of, _fingerprint(group))
            for k, group in enumerate(groups)]


def _kept(out: Path, tasks: list[_Group]) -> dict[int, _Result]:
    """The groups an earlier run finished with the same settings and inputs; every other file of
    ours (what a stopped run left unfinished, or made with other settings) is removed."""
    results = {task.index: result for task in tasks if (result := task.finished()) is not None}
    kept = {name for index in results for name in [tasks[index].record.name] +
            [e.name for e in results[index].entries]}
    for path in out.iterdir():
        if path.name not in kept:
            path.unlink()
    if results:
        print(f"{out}: {len(results)} of {len(tasks)} groups of shards were finished by an earlier run; kept")
    return results


def _check_shards(tasks: list[_Group], results: dict[int, _Result], hold_out: float | None) -> None:
    """Other tools' shards, once read: some samples, and keys that do not repeat."""
    empty = [task.url for task in tasks if results[task.index].samples == 0]
    named = ", ".join(empty[:3]) + (", ..." if len(empty) > 3 else "")
    if len(empty) == len(tasks):
        held = f" (--val-fraction {hold_out} held out none of their samples)" if hold_out is not None else ""
        raise UserError(f"the {tasks[0].split} input shards hold no samples{held}: {named}; check the URLs")
    if empty and hold_out is None:
        log.warning(f"{len(empty)} input shard(s) hold no samples: {named}")
    # Samples keep their input order, and the loader mixes them only within its shuffle buffer.
    histograms = [results[t.index].stats.histogram for t in tasks if results[t.index].samples > 1]
    single = sum(sum(n > 0 for n in h) == 1 for h in histograms)
    if len({c for h in histograms for c, n in enumerate(h) if n}) > 1 and single >= 0.75 * len(histograms):
        log.warning(f"{single} of the {len(histograms)} input shards of the {tasks[0].split} split hold a single "
                    "class each: samples keep their order, so training batches (mixed only within "
                    "data.loader.shuffle_buffer) would hold few classes; shuffle the samples across shards when "
                    "writing them")
    _check_unique_keys(tasks, results)


def _fingerprint(items: list[tuple]) -> str:
    """What a group is made of: its items' keys, labels and payloads (arrays by their pixels)."""
    digest = hashlib.sha256()
    for key, payload, label in items:
        data = payload.tobytes() if isinstance(payload, np.ndarray) else str(payload).encode()
        digest.update(repr((key, label, len(data))).encode())
        digest.update(data)
    return digest.hexdigest()


def _check_unique_keys(tasks: list[_Group], results: dict[int, _Result]) -> None:
    """Keys from other tools' shards may repeat (every shard counting from 0, say), but labelled
    subsets and pseudo-labels find images by key. The groups of a repeat are redone on the next run."""
    seen: dict[str, _Group] = {}
    for task in tasks:
        for entry in results[task.index].entries:
            path = task.out / entry.name
            with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                keys = read_index(path, mm, entry.index, entry.samples)["key"].tolist()
            for key in keys:
                first = seen.get(key)
                if first is not None:
                    for group in (first, task):
                        group.record.unlink(missing_ok=True)
                    where = f"twice in {task.url}" if first is task else f"in both {first.url} and {task.url}"
                    raise UserError(f"sample key '{key}' appears {where}, but keys must be unique (labelled subsets "
                                    "and pseudo-labels find images by key); give the samples distinct keys")
                seen[key] = task


def _class_names(source: Source, kept: dict[str, Manifest], written: dict[str, _Split]) -> list[str]:
    """The source's classes; for a source that names none, 0 to the largest label of any split."""
    if source.classes is not None:
        return source.classes
    count = max([len(m.classes) for m in kept.values()] + [len(w.stats.histogram) for w in written.values()])
    for split, manifest in kept.items():
        if len(manifest.classes) != count:
            raise UserError(f"{split} was imported with {len(manifest.classes)} classes, but the labels of the other "
                            f"split reach {count}; pass --force to import both again")
    return [str(c) for c in range(count)]


def _written(tasks: list[_Group], workers: int) -> Iterator[_Result]:
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
    max_samples: int
    max_bytes: int
    classes: list[str] | None
    read: Callable[[str], Iterator[tuple]] | None  # "shards": the samples of an input shard
    keep: Callable[[str], bool] | None  # "shards": which sample keys belong to this split
    identity: dict  # the import's settings, and
    fingerprint: str  # what the group is made of: a record of other ones is no record of this group

    def shard_name(self, part: int) -> str:
        """SPLIT-00000k.tar; a group over the sample or byte limit continues in SPLIT-00000k-1.tar, ..."""
        return f"{self.split}-{self.index:06d}" + (f"-{part}" if part else "") + ".tar"

    @property
    def record(self) -> Path:
        return self.out / f"{self.split}-{self.index:06d}{RECORD_SUFFIX}"

    @property
    def url(self) -> str:
        return self.items[0][1]

    def finished(self) -> _Result | None:
        """What an earlier run wrote for this group, if it finished it and its shards are all still there."""
        try:
            record = json.loads(self.record.read_text())
            if record["identity"] != self.identity or record["group"] != self.fingerprint:
                return None
            result = _Result.from_json(record)
        except (OSError, ValueError, KeyError, TypeError):
            return None
        for entry in result.entries:
            path = self.out / entry.name
            if not path.is_file() or path.stat().st_size != entry.bytes:
                return None
        return result


@dataclass
class _Result:
    """What a group wrote: its shards, their statistics and the images it could not read."""

    entries: list[ShardEntry]
    stats: SetStats
    unreadable: list[Unreadable]

    @property
    def samples(self) -> int:
        return sum(e.samples for e in self.entries) + len(self.unreadable)

    def to_json(self) -> dict:
        return {"entries": [asdict(e) for e in self.entries], "stats": self.stats.to_json(),
                "unreadable": [asdict(u) for u in self.unreadable]}

    @classmethod
    def from_json(cls, data: dict) -> _Result:
        return cls([ShardEntry(**e) for e in data["entries"]], SetStats.from_json(data["stats"]),
                   [Unreadable(**u) for u in data["unreadable"]])


@dataclass
class _Split:
    """A split's shards, all written, before its manifest."""

    out: Path
    split: str
    entries: list[ShardEntry]
    stats: SetStats
    unreadable: list[Unreadable]
    elapsed: float
    groups_written: int

    def save(self, classes: list[str], image_field: str, identity: dict) -> Manifest:
        out, unreadable = self.out, self.unreadable
        if unreadable:
            (out / UNREADABLE_LIST).write_text("".join(f"{u.source}\t{u.reason}\n" for u in unreadable))
        self.stats.histogram += [0] * (len(classes) - len(self.stats.histogram))
        meta = {"source": identity["source"], "import": identity, "split": self.split, "unreadable": len(unreadable),
                "dpt_scale": dpt_scale.__version__, "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        manifest = self.stats.manifest(self.entries, classes, image_field, meta)
        manifest.save(out)
        for record in out.glob(f"*{RECORD_SUFFIX}"):  # the manifest says it all now
            record.unlink()
        skipped = (f"; {len(unreadable)} unreadable image(s) skipped, listed in {out / UNREADABLE_LIST}"
                   if unreadable else "")
        speed = f", {manifest.num_samples / self.elapsed:.0f} images/s" if self.groups_written else ""
        print(f"{out}: {manifest.num_samples} images in {len(manifest.shards)} shard(s), "
              f"{manifest.num_bytes / 2**20:.1f} MiB{speed}{skipped}")
        return manifest


def _write_group(group: _Group) -> _Result:
    """In a worker: encode one group and write its shard(s), without a manifest; then its record."""
    unreadable = []
    with ShardSetWriter(group.out, classes=group.classes, max_samples=group.max_samples, max_bytes=group.max_bytes,
                        image_field=group.settings.format, name=group.shard_name, save_manifest=False) as writer:
        for result in _encoded(group):
            if isinstance(result, Unreadable):
                unreadable.append(result)
            else:
                writer.write({"__key__": result.key, group.settings.format: result.data, "cls": result.label},
                             result.shape)
    result = _Result(writer.entries, writer.stats, unreadable)
    write_json(group.record, {"identity": group.identity, "group": group.fingerprint, **result.to_json()})
    return result


def _encoded(group: _Group) -> Iterator[Encoded | Unreadable]:
    if group.kind == "shards":
        for _, url, _ in group.items:
            for key, field, data, label in group.read(url):
                if group.keep is None or group.keep(key):
                    yield encode_bytes(key, data, label, group.settings, f"{key}.{field} in {url}")
        return
    encode = encode_array if group.kind == "array" else encode_file
    for item in group.items:
        yield encode(item, group.settings)
