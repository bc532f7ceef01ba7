"""One shard's samples as the loader reads them: parallel arrays built from the shard's index
(index.py), with every sample that cannot be read marked and explained.

One row per sample the manifest lists: its `key`, and in one int64 `table` the columns SHARD (the
shard's number in the manifest), LABEL (the `cls` member, or the caller's mapping from keys),
START and END (the bytes of the member the loader decodes) and, when asked for, JSON_START and
JSON_END. The integers share one array so that the loader builds a stream's rows with one slice,
one concatenation and one gather, not one of each per column (a stream's set-up was the largest
piece of the loader's own work at 28 px; docs/shards.md). `bad` holds a problem code per row
(0: readable); `explain(i)` words row i's problem for a user, naming the shard and member.
"""
from __future__ import annotations

import logging
import mmap
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dpt_scale.errors import ShardError
from dpt_scale.shards.index import NO_LABEL, read_index, walk_index
from dpt_scale.shards.manifest import Manifest, ShardEntry

log = logging.getLogger(__name__)
READABLE, CUT_SHORT, NO_MEMBER, CUT_MEMBER, NOT_A_LABEL = range(5)
SHARD, LABEL, START, END, JSON_START, JSON_END = range(6)  # the table's columns


@dataclass
class ShardRows:
    table: np.ndarray  # int64 (samples, 4), or 6 with the json spans
    keys: np.ndarray
    bad: np.ndarray | None  # None: every row readable
    path: Path
    field: str
    fault: str  # what cut the shard short, if it is
    classes: int

    def explain(self, i: int) -> str:
        key = self.keys[i]
        return f"{self.path}: " + {
            CUT_SHORT: self.fault,
            NO_MEMBER: f"sample '{key}' has no .{self.field} member",
            CUT_MEMBER: f"truncated inside member '{key}.{self.field}'",
            NOT_A_LABEL: f"member '{key}.cls' is not a class index below {self.classes}"}[int(self.bad[i])]


def shard_rows(manifest: Manifest, directory: Path, shard: int, mm: mmap.mmap, field: str,
               with_json: bool = False, labels: Mapping[str, int] | None = None) -> ShardRows:
    entry = manifest.shards[shard]
    path = directory / entry.name
    index, fault = _index(path, mm, entry)
    n, have = entry.samples, min(len(index), entry.samples)
    if len(index) > n:  # what the walk found: a stored index of another length is refused
        raise ShardError(f"{path} holds {len(index)} samples but the manifest lists {n}: the manifest does not "
                         f"match its shards; run `dpt-scale shards verify {directory}`")
    index = index[:have]
    names = index.dtype.names
    keys = index["key"] if have == n else np.concatenate([index["key"], np.full(n - have, "", dtype="U1")])
    table = np.full((n, 6 if with_json else 4), -1, dtype=np.int64)  # -1: no span, and NO_LABEL
    table[:, SHARD] = shard
    # `labels` replaces the shards' own (which are then not used at all)
    table[:have, LABEL] = index["label"] if labels is None else [labels.get(k, NO_LABEL) for k in index["key"].tolist()]
    for ext, at in [(field, START)] + ([("json", JSON_START)] if with_json else []):
        if f"span:{ext}" in names:
            table[:have, at:at + 2] = index[f"span:{ext}"]
    bad = np.zeros(n, dtype=np.int8)
    bad[have:] = CUT_SHORT
    bad[:have][table[:have, END] > len(mm)] = CUT_MEMBER
    bad[:have][table[:have, START] < 0] = NO_MEMBER
    label = table[:have, LABEL]
    bad[:have][(label < NO_LABEL) | (label >= manifest.num_classes)] = NOT_A_LABEL  # BAD_LABEL, or out of range
    cut = str(fault).removeprefix(f"{path}: ") if fault else (
        f"ends after {have} samples but the manifest lists {n}; run `dpt-scale shards verify {directory}`")
    return ShardRows(table, keys, bad if bad.any() else None, path, field, cut, manifest.num_classes)


def _index(path: Path, mm: mmap.mmap, entry: ShardEntry) -> tuple[np.ndarray, ShardError | None]:
    """The shard's index and the fault that cut it short, if any. A shard whose stored index is
    missing or unreadable (a shard cut short loses it first: it is the last member) is walked."""
    if entry.index:
        try:
            return read_index(path, mm, entry.index, entry.samples, entry.index_sha256), None
        except ShardError as exc:
            index, fault = walk_index(path, mm)
            if fault is None:
                log.warning(f"{exc}; read it by walking its headers instead")
            return index, fault
    return walk_index(path, mm)
