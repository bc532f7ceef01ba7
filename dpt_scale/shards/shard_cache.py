"""The shards a loader worker keeps open, and their rows: the most recently used SHARDS_KEPT of
each (a map holds a file descriptor; rows are ~100 bytes a sample), so that all of a small set
(MNIST: 10 shards) stays, and epochs after the first neither rebuild rows nor fault pages in again."""
from __future__ import annotations

import mmap
from collections.abc import Iterable
from pathlib import Path

from dpt_scale.shards.manifest import Manifest
from dpt_scale.shards.rows import ShardRows, shard_rows
from dpt_scale.shards.tar import open_map

SHARDS_KEPT = 64


class ShardCache:
    def __init__(self, directory: Path, manifest: Manifest, field: str, with_json: bool, labels):
        self.dir, self.manifest, self.field, self.with_json, self.labels = directory, manifest, field, with_json, labels
        self._maps: dict[int, mmap.mmap] = {}  # least recently used first
        self._rows: dict[int, ShardRows] = {}  # oldest first

    def maps(self, shards: Iterable[int]) -> dict[int, mmap.mmap]:
        """The memory maps of these shards, opened as needed (a ShardError for one that cannot be)."""
        out = {}
        for shard in set(shards):
            mm = self._maps.pop(shard, None)
            if mm is None:
                mm = open_map(str(self.dir / self.manifest.shards[shard].name))[0]
            self._maps[shard] = out[shard] = mm  # now the most recently used
        while len(self._maps) > SHARDS_KEPT:
            del self._maps[next(iter(self._maps))]
        return out

    def rows(self, shard: int) -> ShardRows:
        """The shard's rows (read through its index, or by walking it); its map is checked still open."""
        mm = self.maps([shard])[shard]
        rows = self._rows.get(shard)
        if rows is None:
            rows = self._rows[shard] = shard_rows(self.manifest, self.dir, shard, mm, self.field, self.with_json,
                                                  self.labels)
            if len(self._rows) > SHARDS_KEPT:
                del self._rows[next(iter(self._rows))]
        return rows
