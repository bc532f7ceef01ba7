"""The manifest of a shard set: what every reader needs to plan work without opening a shard.

A shard set is a directory of plain tar files plus `manifest.json`. The manifest is written last
and atomically, so a directory with a manifest holds a complete set.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from dpt_scale import jsonsafe
from dpt_scale.errors import ShardError
from dpt_scale.shards.tar import BLOCK

MANIFEST = "manifest.json"
FORMAT = "dpt_scale.shards/1"
IMAGE_FIELDS = ("png", "jpg", "jpeg", "webp")
INDEX_EVERY = 64  # the manifest records the byte offset of every 64th sample of each shard
MAX_SIDE = 65535  # pixels: JPEG's limit, and more than any batch of images can hold


@dataclass
class ShardEntry:
    name: str  # file name inside the shard set's directory
    samples: int
    bytes: int
    sha256: str
    # Byte offsets of samples 0, k, 2k, ... (k = Manifest.index_every), so that a reader can start
    # inside a shard without walking it from the top. Empty for shards written by other tools.
    offsets: list[int] = field(default_factory=list)
    # [start, end) of the shard's `__index__` member (index.py) and its sha256; empty for shards without one.
    index: list[int] = field(default_factory=list)
    index_sha256: str = ""


@dataclass
class Manifest:
    shards: list[ShardEntry]
    classes: list[str]  # class index -> name
    class_histogram: list[int]  # samples per class index, from each sample's `cls`
    unlabelled: int = 0  # samples without `cls`
    # {"field": "png", "channels": 1, "size": [H, W] or None if sizes vary, "min_size", "max_size"}
    image: dict | None = None
    meta: dict = field(default_factory=dict)  # provenance: source, settings, tool versions
    index_every: int = INDEX_EVERY
    format: str = FORMAT

    def seek(self, shard: int, sample: int) -> tuple[int, int]:
        """(index, byte offset) of the closest indexed sample at or before `sample` in a shard."""
        offsets = self.shards[shard].offsets
        if not offsets:
            return 0, 0
        i = min(sample // self.index_every, len(offsets) - 1)
        return i * self.index_every, offsets[i]

    def square_size(self, directory: str | os.PathLike, purpose: str) -> int:
        """The side of the set's images, which must all be square and of one size for `purpose`."""
        if self.num_samples == 0:
            raise ShardError(f"{purpose} needs images, but {directory} is an empty shard set (0 samples); import "
                             "images into it (`dpt-scale data import`) or use another set")
        if self.image is None:
            raise ShardError(f"{purpose} needs images, but the samples of {directory} have no image member "
                             f"({', '.join(IMAGE_FIELDS)}); make the set with `dpt-scale data import`")
        size = self.image["size"]
        if not size or size[0] != size[1]:
            found = size or [self.image["min_size"], self.image["max_size"]]
            raise ShardError(f"{purpose} needs square images of one size; {directory} holds {found} "
                             "(import with --image-size)")
        return size[0]

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def num_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def identity(self) -> str:
        """A short checksum of the set's content (its shards' checksums, in order)."""
        return hashlib.sha256("".join(s.sha256 for s in self.shards).encode()).hexdigest()[:16]

    def save(self, directory: str | os.PathLike) -> Path:
        return write_json(Path(directory) / MANIFEST, dataclasses.asdict(self), indent=1)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Manifest":
        path = Path(directory) / MANIFEST
        if not path.is_file():
            hint = "is it a shard set? `dpt-scale data import` makes one"
            if not Path(directory).is_dir():
                raise ShardError(f"shard set not found: {directory} ({hint})")
            raise ShardError(f"{directory} has no {MANIFEST}: it is not a complete shard set ({hint})")
        try:
            data = json.loads(path.read_text())
            if data.get("format") != FORMAT:
                raise ShardError(f"{path}: format {data.get('format')!r} is not {FORMAT!r}; re-create the shard set")
            data["shards"] = [ShardEntry(**s) for s in data["shards"]]
            manifest = cls(**data)
            manifest.check()
            return manifest
        except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
            raise ShardError(f"{path} is damaged ({exc}); re-create the shard set or restore the file") from None

    def check(self) -> None:
        """A ValueError naming the first value that no writer of ours makes: every reader plans from
        these values without opening a shard, so a wrong type or a name outside the set would fail
        (or read elsewhere) far from here."""
        names = set()
        for i, s in enumerate(self.shards):
            where = f"shards[{i}]"
            if not isinstance(s.name, str) or s.name in ("", ".", "..") or "/" in s.name or "\0" in s.name:
                raise ValueError(f"{where}.name {s.name!r} is not the name of a file in the set's folder")
            if s.name in names:
                raise ValueError(f"{where}.name {s.name!r} is listed twice")
            names.add(s.name)
            _whole(s.samples, f"{where}.samples")
            _whole(s.bytes, f"{where}.bytes")
            if s.samples * BLOCK > s.bytes:  # every sample has a member, every member a 512-byte header
                raise ValueError(f"{where} lists {s.samples} samples in {s.bytes} bytes, more than fit")
            for key in ("sha256", "index_sha256"):
                if not isinstance(getattr(s, key), str):
                    raise ValueError(f"{where}.{key} must be text, got {getattr(s, key)!r}")
            _whole_list(s.offsets, f"{where}.offsets")
            _whole_list(s.index, f"{where}.index")
            if len(s.index) not in (0, 2) or s.index and not s.index[0] <= s.index[1] <= s.bytes:
                raise ValueError(f"{where}.index must be [start, end] within its {s.bytes} bytes, got {s.index}")
        if not isinstance(self.classes, list) or not all(isinstance(c, str) for c in self.classes):
            raise ValueError(f"classes must be a list of names, got {self.classes!r}")
        _whole_list(self.class_histogram, "class_histogram")
        if len(self.class_histogram) != len(self.classes):
            raise ValueError(f"class_histogram has {len(self.class_histogram)} counts for {len(self.classes)} classes")
        _whole(self.unlabelled, "unlabelled")
        _whole(self.index_every, "index_every", least=1)
        if not isinstance(self.meta, dict):
            raise ValueError(f"meta must be a mapping, got {self.meta!r}")
        if self.image is not None:
            image = self.image
            if not isinstance(image, dict) or image.get("field") not in IMAGE_FIELDS or \
                    image.get("channels") not in (1, 3):
                raise ValueError(f"image must name its field ({', '.join(IMAGE_FIELDS)}) and channels (1 or 3), "
                                 f"got {image!r}")
            for key in ("size", "min_size", "max_size"):
                size = image.get(key, ())
                if not (size is None and key == "size"):  # None: sizes vary
                    _whole_list(size, f"image.{key}", least=1)
                    if len(size) != 2 or max(size) > MAX_SIDE:
                        raise ValueError(f"image.{key} must be [height, width] of at most {MAX_SIDE}, got {size!r}")


def _whole(value, where: str, least: int = 0) -> None:
    if type(value) is not int or value < least:  # (not bool, a subclass of int)
        raise ValueError(f"{where} must be a whole number of at least {least}, got {value!r}")


def _whole_list(values, where: str, least: int = 0) -> None:
    if not isinstance(values, list):
        raise ValueError(f"{where} must be a list of whole numbers, got {values!r}")
    for i, value in enumerate(values):
        _whole(value, f"{where}[{i}]", least)


def write_json(path: str | os.PathLike, data, indent: int | None = None) -> Path:
    """Write JSON so that `path` holds either its old content or all of the new: a temporary, fsynced,
    then renamed (manifests, sidecars and progress records are all read as proof of finished work)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(jsonsafe.dumps(data, str(path), indent=indent))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path
