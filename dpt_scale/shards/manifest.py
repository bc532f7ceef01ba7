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

MANIFEST = "manifest.json"
FORMAT = "dpt_scale.shards/1"
IMAGE_FIELDS = ("png", "jpg", "jpeg", "webp")
INDEX_EVERY = 64  # the manifest records the byte offset of every 64th sample of each shard


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
            return cls(**data)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ShardError(f"{path} is damaged ({exc}); re-create the shard set or restore the file") from None


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
