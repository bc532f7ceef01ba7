"""One shard's samples as the loader reads them: parallel arrays built from the shard's index
(index.py), with every sample that cannot be read marked and explained.

Columns, one row per sample the manifest lists: `shard` (the shard's number in the manifest),
`key`, `label` (the `cls` member, or the caller's mapping from keys), `span` ([start, end) of the
member the loader decodes) and, when asked for, `json` (its span). `bad` holds a problem code per
row (0: readable); `explain(i)` words row i's problem for a user, naming the shard and member.
"""
from __future__ import annotations

import logging
import mmap
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dpt_scale.errors import ShardError
from dpt_scale.shards.index import BAD_LABEL, NO_LABEL, read_index, walk_index
from dpt_scale.shards.manifest import Manifest, ShardEntry

log = logging.getLogger(__name__)
READABLE, CUT_SHORT, NO_MEMBER, CUT_MEMBER, NOT_A_LABEL = range(5)


@dataclass
class ShardRows:
    columns: dict[str, np.ndarray]
    bad: np.ndarray | None  # None: every row readable
    path: Path
    field: str
    fault: str  # what cut the shard short, if it is

    def explain(self, i: int) -> str:
        key = self.columns["key"][i]
        return f"{self.path}: " + {
            CUT_SHORT: self.fault,
            NO_MEMBER: f"sample '{key}' has no .{self.field} member",
            CUT_MEMBER: f"truncated inside member '{key}.{self.field}'",
            NOT_A_LABEL: f"member '{key}.cls' is not an integer"}[int(self.bad[i])]


def shard_rows(manifest: Manifest, directory: Path, shard: int, mm: mmap.mmap, field: str,
               with_json: bool = False, labels: Mapping[str, int] | None = None) -> ShardRows:
    entry = manifest.shards[shard]
    path = directory / entry.name
    index, fault = _index(path, mm, entry)
    n, have = entry.samples, min(len(index), entry.samples)
    index = index[:have]
    names = index.dtype.names

    def padded(values, fill, dtype, shape=()):
        out = np.full((n, *shape), fill, dtype=dtype)
        out[:have] = values
        return out

    def span(ext):
        return padded(index[f"span:{ext}"], -1, np.int64, (2,)) if f"span:{ext}" in names \
            else np.full((n, 2), -1, dtype=np.int64)

    keys = index["key"] if have == n else np.concatenate([index["key"], np.full(n - have, "", dtype="U1")])
    # `labels` replaces the shards' own (which are then not used at all)
    label = index["label"] if labels is None else [labels.get(k, NO_LABEL) for k in index["key"].tolist()]
    columns = {"shard": np.full(n, shard, dtype=np.int64), "key": keys,
               "label": padded(label, NO_LABEL, np.int64), "span": span(field)}
    if with_json:
        columns["json"] = span("json")
    bad = np.zeros(n, dtype=np.int8)
    bad[have:] = CUT_SHORT
    bad[:have][columns["span"][:have, 1] > len(mm)] = CUT_MEMBER
    bad[:have][columns["span"][:have, 0] < 0] = NO_MEMBER
    bad[:have][columns["label"][:have] == BAD_LABEL] = NOT_A_LABEL
    cut = str(fault).removeprefix(f"{path}: ") if fault else (
        f"ends after {have} samples but the manifest lists {n}; run `dpt-scale shards verify {directory}`")
    return ShardRows(columns, bad if bad.any() else None, path, field, cut)


def _index(path: Path, mm: mmap.mmap, entry: ShardEntry) -> tuple[np.ndarray, ShardError | None]:
    """The shard's index and the fault that cut it short, if any. A shard whose stored index is
    missing or unreadable (a shard cut short loses it first: it is the last member) is walked."""
    if entry.index:
        try:
            return read_index(path, mm, entry.index, entry.samples), None
        except ShardError as exc:
            index, fault = walk_index(path, mm)
            if fault is None:
                log.warning(f"{exc}; read it by walking its headers instead")
            return index, fault
    return walk_index(path, mm)
