"""Writing shards: one tar at a time, visible under its final name only once complete.

webdataset's ShardWriter writes straight to the final name (a crash leaves a truncated tar that
later stops readers) and its `post=` hook also runs after an exception. So we keep webdataset's
TarWriter for the tar format and own the file: it is written to `NAME.tmp`, hashed on the fly,
fsynced and renamed only on success; on an exception the temporary is removed, and a temporary
left by a killed process is removed by the next writer of the same shard. A shard's last member
is its sample index (index.py), built as the samples are written.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import webdataset as wds

from dpt_scale.shards.index import INDEX_MEMBER, IndexBuilder, parse_label
from dpt_scale.shards.manifest import INDEX_EVERY, Manifest, ShardEntry

TMP_SUFFIX = ".tmp"
_MEMBER_OVERHEAD = 1024  # tar header + worst-case padding, for the byte limit


class _HashingFile:
    """A write-only file that also feeds a sha256 and counts bytes."""

    def __init__(self, raw):
        self.raw, self.sha256, self.bytes = raw, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.bytes += len(data)
        return self.raw.write(data)


def encode_fields(sample: dict) -> dict:
    """Turn a sample's values into bytes: `cls` as ASCII digits, `json` as UTF-8 JSON. Keys such as
    `__offset__` (added by the reader) are dropped."""
    out = {"__key__": sample["__key__"]}
    for name, value in sample.items():
        if name.startswith("__") or value is None:  # __key__ is the member name; others are metadata
            continue
        if name == "cls":
            value = str(int(value)).encode()
        elif name == "json" and not isinstance(value, (bytes, bytearray)):
            value = json.dumps(value, sort_keys=True).encode()
        out[name] = value
    return out


class ShardWriter:
    """One tar shard. Use as a context manager: complete on normal exit, removed on an exception."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + TMP_SUFFIX)
        self.tmp.unlink(missing_ok=True)  # left behind by a killed writer
        self._file = open(self.tmp, "wb")
        self._hashing = _HashingFile(self._file)
        # mtime fixed so that the same samples always give the same bytes (and checksum).
        self._tar = wds.TarWriter(self._hashing, encoder=False, mtime=0, user="dpt", group="dpt")
        self.samples = 0
        self.payload = 0  # estimated bytes so far, for the caller's byte limit
        self.offsets: list[int] = []  # byte offset of every INDEX_EVERY-th sample
        self.index = IndexBuilder()

    def write(self, sample: dict) -> None:
        self.write_encoded(encode_fields(sample))

    def write_encoded(self, fields: dict) -> None:
        stream = self._tar.tarstream
        if self.samples % INDEX_EVERY == 0:
            self.offsets.append(stream.offset)
        key, spans = fields["__key__"], {}
        for ext in sorted(fields):  # one member at a time (TarWriter's order), to learn where each lies
            if ext != "__key__":
                self._tar.write({"__key__": key, ext: fields[ext]})
                end = stream.offset - (-len(fields[ext]) % tarfile.BLOCKSIZE)  # its data ends before the padding
                spans[ext] = (end - len(fields[ext]), end)
        self.index.add(key, parse_label(fields.get("cls")), spans)
        self.samples += 1
        self.payload += estimate_size(fields)

    def _write_index(self) -> tuple[list[int], str]:
        data = self.index.to_bytes()
        info = tarfile.TarInfo(INDEX_MEMBER)
        info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, self._tar.mode, "dpt", "dpt"
        self._tar.tarstream.addfile(info, io.BytesIO(data))
        end = self._tar.tarstream.offset - (-len(data) % tarfile.BLOCKSIZE)
        return [end - len(data), end], hashlib.sha256(data).hexdigest()

    def close(self) -> ShardEntry:
        index, index_sha256 = self._write_index()
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp, self.path)
        return ShardEntry(self.path.name, self.samples, self._hashing.bytes, self._hashing.sha256.hexdigest(),
                          self.offsets, index, index_sha256)

    def abort(self) -> None:
        try:
            self._tar.close()  # else tarfile's finaliser later writes to the closed file
        except OSError:
            pass  # e.g. the disk is full: the shard is being discarded anyway
        self._file.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.entry = self.close()
        else:
            self.abort()


def estimate_size(fields: dict) -> int:
    return sum(len(v) + _MEMBER_OVERHEAD for k, v in fields.items() if k != "__key__")


@dataclass
class SetStats:
    """What the manifest says about a set's samples; parts written apart (by import workers) merge.
    With `grows`, the class histogram lengthens to the largest label seen (classes named later)."""

    histogram: list[int]
    unlabelled: int = 0
    channels: set[int] = field(default_factory=set)
    min_size: tuple[int, int] | None = None
    max_size: tuple[int, int] | None = None
    grows: bool = False

    def add(self, cls: int | None, image_shape: tuple[int, int, int] | None) -> None:
        if cls is None:
            self.unlabelled += 1
        else:
            if self.grows and int(cls) >= len(self.histogram):
                self.histogram += [0] * (int(cls) + 1 - len(self.histogram))
            self.histogram[int(cls)] += 1
        if image_shape is not None:
            c, h, w = image_shape
            self.merge(SetStats([0] * len(self.histogram), 0, {c}, (h, w), (h, w)))

    def merge(self, other: "SetStats") -> None:
        histogram = self.histogram + [0] * (len(other.histogram) - len(self.histogram))
        self.histogram = [n + (other.histogram[c] if c < len(other.histogram) else 0) for c, n in enumerate(histogram)]
        self.unlabelled += other.unlabelled
        self.channels |= other.channels
        if other.min_size is not None:
            self.min_size = other.min_size if self.min_size is None else \
                (min(self.min_size[0], other.min_size[0]), min(self.min_size[1], other.min_size[1]))
            self.max_size = other.max_size if self.max_size is None else \
                (max(self.max_size[0], other.max_size[0]), max(self.max_size[1], other.max_size[1]))

    def to_json(self) -> dict:
        return {"histogram": self.histogram, "unlabelled": self.unlabelled, "channels": sorted(self.channels),
                "min_size": self.min_size, "max_size": self.max_size, "grows": self.grows}

    @classmethod
    def from_json(cls, data: dict) -> "SetStats":
        sizes = [None if data[k] is None else tuple(data[k]) for k in ("min_size", "max_size")]
        return cls(list(data["histogram"]), data["unlabelled"], set(data["channels"]), *sizes, data["grows"])

    def manifest(self, entries: list[ShardEntry], classes: list[str] | None, image_field: str | None,
                 meta: dict) -> Manifest:
        """`classes` None: the classes are named by their index, 0 to the largest label."""
        image = None
        if image_field is not None and self.min_size is not None:
            if len(self.channels) != 1:
                raise ValueError(f"images with different channel counts {sorted(self.channels)} in one shard set")
            image = {"field": image_field, "channels": next(iter(self.channels)),
                     "size": list(self.min_size) if self.min_size == self.max_size else None,
                     "min_size": list(self.min_size), "max_size": list(self.max_size)}
        if classes is None:
            classes = [str(c) for c in range(len(self.histogram))]
        return Manifest(entries, classes, self.histogram, self.unlabelled, image, meta)


class ShardSetWriter:
    """A directory of shards `PREFIX-000000.tar`, ... rolled over by sample count and bytes, then
    `manifest.json`, written last. Samples with `cls` feed the class histogram (`classes` None: as
    many classes as the largest label needs, named by index); pass each image's (channels, height,
    width) so that the manifest can describe the images. `name(i)` may choose the shard names
    instead, and `save_manifest=False` leaves the manifest to the caller (for sets written in parts)."""

    def __init__(self, directory: str | os.PathLike, *, classes: list[str] | None, prefix: str = "shard",
                 max_samples: int = 1000, max_bytes: int = 256 * 2**20, image_field: str | None = "png",
                 meta: dict | None = None, name: Callable[[int], str] | None = None, save_manifest: bool = True):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name = name or (lambda i: f"{prefix}-{i:06d}.tar")
        self.max_samples, self.max_bytes, self.save_manifest = max_samples, max_bytes, save_manifest
        self.classes, self.image_field, self.meta = classes, image_field, meta or {}
        self.stats = SetStats([0] * len(classes)) if classes is not None else SetStats([], grows=True)
        self.entries: list[ShardEntry] = []
        self._shard: ShardWriter | None = None

    def write(self, sample: dict, image_shape: tuple[int, int, int] | None = None) -> None:
        fields = encode_fields(sample)
        incoming = estimate_size(fields)
        shard = self._shard
        if shard is not None and (shard.samples >= self.max_samples or shard.payload + incoming > self.max_bytes):
            self.end_shard()
        if self._shard is None:
            self._shard = ShardWriter(self.dir / self.name(len(self.entries)))
        self._shard.write_encoded(fields)
        self.stats.add(sample.get("cls"), image_shape)

    def end_shard(self) -> None:
        """Complete the current shard now; the next sample starts a new one."""
        if self._shard is not None:
            self.entries.append(self._shard.close())
            self._shard = None

    def close(self) -> Manifest:
        self.end_shard()
        manifest = self.stats.manifest(self.entries, self.classes, self.image_field, self.meta)
        if self.save_manifest:
            manifest.save(self.dir)
        return manifest

    def abort(self) -> None:
        if self._shard is not None:
            self._shard.abort()
            self._shard = None

    def __enter__(self) -> "ShardSetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.manifest = self.close()
        else:
            self.abort()
