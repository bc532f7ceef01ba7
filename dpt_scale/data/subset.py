"""Labelled subsets: the keys of the few training images whose label stage 1 may see.

A subset file is plain text, one key per line; lines starting with '#' are comments. It is made
either by drawing K keys per class (deterministic for a seed, whatever the shard layout) or from
a list of keys or file names such as the few-label ImageNet lists of the MSN/DPT papers
(`n04235860_14959.JPEG` per line).
"""
from __future__ import annotations

import os
import random
from collections import defaultdict
from pathlib import Path

from dpt_scale.errors import ShardError, UserError
from dpt_scale.layout import layout
from dpt_scale.shards.manifest import Manifest
from dpt_scale.shards.tar import iter_samples


def read_labels(shard_dir: str | Path) -> dict[str, int]:
    """key -> class of every sample of a shard set (only the small `cls` members are copied). Every
    key is walked, so this is also where a set too broken to draw a subset from is refused: empty,
    damaged, not as its manifest says, or holding a key twice (labels are joined by key)."""
    shard_dir = Path(shard_dir)
    manifest = Manifest.load(shard_dir)
    if manifest.num_samples == 0:
        raise ShardError(f"{shard_dir} is an empty shard set (0 samples); import images into it "
                         "(`dpt-scale data import`) or name another set")
    fix = f"run `dpt-scale shards verify {shard_dir}` to list every fault, then restore or re-import the set"
    labels, seen = {}, {}
    for entry in manifest.shards:
        count = 0
        for sample in _labels_of(shard_dir / entry.name, fix):
            key, count = sample["__key__"], count + 1
            if key in seen:
                raise ShardError(f"{shard_dir}: key '{key}' is in both {seen[key]} and {entry.name}, but keys "
                                 f"must be unique; {fix}")
            seen[key] = entry.name
            if "cls" in sample:
                try:
                    labels[key] = int(sample["cls"])
                except ValueError:
                    raise ShardError(f"{shard_dir / entry.name}: member '{key}.cls' is not a class index; "
                                     f"{fix}") from None
        if count != entry.samples:
            raise ShardError(f"{shard_dir / entry.name} holds {count} samples but the manifest lists "
                             f"{entry.samples}: the manifest does not match its shards; {fix}")
    if not labels:
        raise UserError(f"{shard_dir}: no sample carries a label (cls), so no labelled subset can be drawn; "
                        "import the images with their labels (class folders, an IDX labels file)")
    return labels


def _labels_of(path: Path, fix: str):
    """The samples of one shard with only their `cls` member; a missing or damaged shard names the fix."""
    try:
        yield from iter_samples(path, fields=frozenset({"cls"}))
    except ShardError as exc:
        raise ShardError(f"{exc}; {fix}") from None


def per_class_subset(labels: dict[str, int], classes: list[str], per_class: int, seed: int) -> list[str]:
    by_class = defaultdict(list)
    for key, label in labels.items():
        by_class[label].append(key)
    short = [(c, len(by_class[c])) for c in range(len(classes)) if len(by_class[c]) < per_class]
    if short:
        c, n = short[0]
        raise UserError(f"class {c} ('{classes[c]}') has {n} image(s), fewer than --per-class {per_class}"
                        + (f" ({len(short)} classes are short)" if len(short) > 1 else "") + "; lower --per-class")
    keys = []
    for c in range(len(classes)):
        keys += sorted(random.Random(f"subset:{seed}:{c}").sample(sorted(by_class[c]), per_class))
    return keys


def subset_from_list(labels: dict[str, int], names: list[str]) -> list[str]:
    """Match each name to a key: the key itself, or a file name whose stem is the key's last part."""
    by_stem: dict[str, str | None] = {}
    for key in labels:
        stem = key.rsplit("/", 1)[-1]
        by_stem[stem] = None if stem in by_stem else key  # None: ambiguous
    keys, missing, ambiguous = [], [], []
    for name in names:
        if name in labels:
            keys.append(name)
            continue
        stem = Path(name).name.split(".", 1)[0]
        match = by_stem.get(stem.replace(" ", "_"), "")
        if match == "":
            missing.append(name)
        elif match is None:
            ambiguous.append(name)
        else:
            keys.append(match)
    if missing:
        raise UserError(f"{len(missing)} listed name(s) match no sample of the shard set, e.g. {shown(missing)}; "
                        "check that the list belongs to this data set")
    if ambiguous:
        raise UserError(f"{len(ambiguous)} listed name(s) match several samples, e.g. {shown(ambiguous)}; "
                        "list full keys (CLASS/NAME) instead")
    if len(set(keys)) != len(keys):
        raise UserError("the list names some images twice; remove the duplicates")
    return keys


def read_list(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"list file not found: {path} (--from-list / data.labelled.list: a text file of keys "
                        "or file names, one per line)")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # (-sig: the byte-order mark some editors put first is not part of a key)
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {raw[exc.start]:#04x} at offset {exc.start}); "
                        "save it as UTF-8") from None
    names, lines = [], {}
    for number, line in enumerate(text.splitlines(), 1):
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        if name in lines:  # a set of keys, read twice, would silently be one image fewer than listed
            raise UserError(f"{path} lists {shown([name])} twice (lines {lines[name]} and {number}); "
                            "remove the duplicates")
        lines[name] = number
        names.append(name)
    if not names:
        raise UserError(f"{path} lists no keys")
    return names


def shown(names: list[str], most: int = 3, width: int = 80) -> str:
    """The first names of a list for a message, each cut to `width` characters (a list may hold any line)."""
    return repr([n if len(n) <= width else n[:width] + "..." for n in names[:most]])


def write_subset(path: str | Path, keys: list[str], labels: dict[str, int], header: list[str]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # ranks may write the same subset at once
    ordered = sorted(keys, key=lambda k: (labels[k], k))
    tmp.write_text("".join(f"# {line}\n" for line in header) + "".join(f"{k}\n" for k in ordered))
    os.replace(tmp, path)


def subset_path(recipe) -> Path:
    return layout(recipe).labelled


def make_subset(recipe, shards: str | Path, out: str | Path) -> tuple[list[str], str]:
    """Draw the recipe's labelled subset (data.labelled) from a shard set and write it to `out`."""
    cfg = recipe.data.labelled
    manifest = Manifest.load(shards)
    labels = read_labels(shards)
    if cfg.list:
        keys, how = subset_from_list(labels, read_list(cfg.list)), f"from the list {cfg.list}"
    else:
        keys = per_class_subset(labels, manifest.classes, cfg.per_class, cfg.seed)
        how = f"{cfg.per_class} per class, seed {cfg.seed}"
    write_subset(out, keys, labels, [f"dpt_scale labelled subset of {shards}: {len(keys)} keys, {how}"])
    return keys, how
