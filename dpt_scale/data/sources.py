"""Where `dpt-scale data import` gets images: a registry of sources, each turning the recipe's
`data` section into class names and, per split, a list of items (key, payload, label).

Keys are stable: derived from the source index (arrays), the relative path (files) or taken from
the input shards (webdataset), never from the import order. Payloads are arrays ("array" sources)
or file paths ("file" sources); a "shards" source lists its input shards instead, each item
(url, url, version), and `read(url)` gives their samples in the import workers.
"""
from __future__ import annotations

import importlib.resources
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dpt_scale.data.idx import read_idx
from dpt_scale.errors import UserError
from dpt_scale.recipe.schema import Data

# What PIL reads and ImageNet-style trees contain (the same list as torchvision's ImageFolder).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class Source:
    classes: list[str] | None  # None: as many as the labels need, named by index (known once read)
    splits: dict[str, list[tuple]]  # "train" / "val" -> [(key, payload, label), ...]
    kind: str  # "array", "file" or "shards"
    channels: int  # what the source has; the recipe may ask for another
    notes: list[str] = field(default_factory=list)  # things the user should know, printed once
    # "shards": (key, image field, image bytes, label) of each sample of one input shard
    read: Callable[[str], Iterator[tuple]] | None = None
    settings: dict = field(default_factory=dict)  # the source's own keys that change the shards


SOURCES: dict[str, Callable[[Data], Source]] = {}


def register(name: str):
    def add(fn):
        SOURCES[name] = fn
        return fn
    return add


def _expect_paths(cfg: Data, count: int, usage: str) -> None:
    if len(cfg.paths) != count:
        raise UserError(f"data import {cfg.source} expects {usage}; got {len(cfg.paths)} path(s): {cfg.paths}")
    if cfg.val_paths and len(cfg.val_paths) != count:
        raise UserError(f"data import {cfg.source}: --val expects {usage}; got {cfg.val_paths}")


@register("mnist")
def mnist(cfg: Data) -> Source:
    """The embedded, class-balanced MNIST subset (10,000 train / 2,000 val; tools/make_mnist_subset.py)."""
    _expect_paths(cfg, 0, "no paths (the data ships with the package)")
    with importlib.resources.files("dpt_scale").joinpath("assets/mnist_subset.npz").open("rb") as f:
        arrays = dict(np.load(f))
    splits = {split: [(f"mnist-{origin}-{int(i):05d}", image, int(label)) for i, image, label in
                      zip(arrays[f"{split}_index"], arrays[f"{split}_images"], arrays[f"{split}_labels"])]
              for split, origin in (("train", "train"), ("val", "test"))}
    return Source([str(c) for c in range(10)], splits, "array", channels=1)


@register("idx")
def idx(cfg: Data) -> Source:
    """IDX image and label files (MNIST family): paths [IMAGES, LABELS], val_paths likewise."""
    _expect_paths(cfg, 2, "two paths: IMAGES LABELS (IDX files, optionally .gz)")
    splits = {"train": _idx_items(*cfg.paths, "train")}
    if cfg.val_paths:
        splits["val"] = _idx_items(*cfg.val_paths, "val")
    labels = {item[2] for items in splits.values() for item in items}
    classes = [str(c) for c in range(max(labels) + 1)]
    return Source(classes, splits, "array", channels=1)


def _idx_items(images_path: str, labels_path: str, split: str) -> list[tuple]:
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise UserError(f"{images_path}: expected uint8 images of shape (N, H, W), got {images.dtype} {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images) or labels.min() < 0:
        raise UserError(f"{labels_path}: expected {len(images)} non-negative labels, got shape {labels.shape}")
    return [(f"{split}-{i:06d}", images[i], int(labels[i])) for i in range(len(images))]


@register("imagefolder")
def imagefolder(cfg: Data) -> Source:
    """Class-per-subfolder trees: paths [ROOT]. ROOT/train and ROOT/val when they exist (the
    ImageNet layout), else ROOT itself for training; val_paths [VAL_ROOT] names the val tree."""
    _expect_paths(cfg, 1, "one path: the root of a class-per-subfolder tree")
    root = Path(cfg.paths[0])
    if not root.is_dir():
        raise UserError(f"image folder not found: {root}; give the root of a class-per-subfolder tree "
                        "(PATH, data.paths)")
    train_root = root / "train" if (root / "train").is_dir() else root
    val_root = Path(cfg.val_paths[0]) if cfg.val_paths else (root / "val" if train_root != root else None)
    if val_root is not None and not val_root.is_dir():
        raise UserError(f"validation image folder not found: {val_root}; give a class-per-subfolder tree "
                        "(--val, data.val_paths)")
    classes = sorted(e.name for e in os.scandir(train_root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise UserError(f"{train_root} has no class subfolders; expected ROOT/CLASS/IMAGE files")
    notes = []
    splits = {"train": _list_tree(train_root, classes, notes)}
    if val_root is not None:
        extra = sorted(e.name for e in os.scandir(val_root) if e.is_dir() and e.name not in classes)
        if extra:
            raise UserError(f"{val_root} has classes that {train_root} lacks: {extra[:5]}")
        splits["val"] = _list_tree(val_root, classes, notes)
    return Source(classes, splits, "file", channels=3, notes=notes)


def _list_tree(root: Path, classes: list[str], notes: list[str]) -> list[tuple]:
    items, seen, ignored = [], {}, 0
    for label, name in enumerate(classes):
        class_dir = root / name
        if not class_dir.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(class_dir):
            dirnames.sort()
            for filename in sorted(filenames):
                if not filename.lower().endswith(IMAGE_EXTENSIONS):
                    ignored += not filename.startswith(".")
                    continue
                path = Path(dirpath) / filename
                key = path_key(path.relative_to(root))
                if key in seen:
                    raise UserError(f"{path} and {seen[key]} map to the same sample key '{key}'; rename one")
                seen[key] = path
                items.append((key, str(path), label))
    if ignored:
        notes.append(f"{root}: ignored {ignored} file(s) without an image extension ({', '.join(IMAGE_EXTENSIONS)})")
    if not items:
        raise UserError(f"{root}: no images found under its class subfolders")
    return items


def path_key(relative: Path) -> str:
    """A sample key from a relative path: the extension dropped, other dots (which would end a
    webdataset key early) and whitespace replaced by '_'. n01440764/n01440764_10026.JPEG ->
    n01440764/n01440764_10026."""
    return re.sub(r"[.\s]", "_", relative.with_suffix("").as_posix())


@register("webdataset")
def webdataset(cfg: Data) -> Source:
    """Tar shards made by other tools (img2dataset, webdataset's ShardWriter): paths are URLs in
    webdataset's syntax (data-{000000..000099}.tar, pipe:CMD, http://...), val_paths likewise.
    Samples keep their keys and their order; each input shard becomes one group of output shards."""
    from dpt_scale.data.webdataset import ShardReader, expand_urls, version

    if not cfg.paths:
        raise UserError("data import webdataset expects one or more URLs: tar files, brace ranges "
                        "(data-{000000..000099}.tar), pipe: commands or http(s) URLs; got none")
    reader = ShardReader.from_settings(cfg.webdataset)
    splits = {"train": expand_urls(cfg.paths, "the URLs (data.paths)")}
    if cfg.val_paths:
        splits["val"] = expand_urls(cfg.val_paths, "--val (data.val_paths)")
    classes = None if reader.classes is None else list(reader.classes)
    settings = {"image": list(reader.image), "label": reader.label if reader.label_field else None,
                "classes": classes}
    return Source(classes, {split: [(url, url, version(url)) for url in urls] for split, urls in splits.items()},
                  "shards", channels=3, read=reader.samples, settings={"webdataset": settings})
