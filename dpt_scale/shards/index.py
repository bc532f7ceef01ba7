"""A shard's sample index: each sample's key, label and where each of its members lies.

Our writer stores it as the shard's last member, `__index__` (a .npy structured array), and the
manifest records where that member's bytes are. A reader then finds every sample with one array
lookup instead of walking the tar's headers: the walk costs ~5 us per sample in Python, a fifth
of decoding a 28x28 PNG, and the loader's batches are built with array operations from the index
(docs/benchmarks.md). The member stays inside the tar, so copying a shard copies its index and
the shard's checksum covers it; stock `tar` lists it and stock webdataset skips it as metadata
(names `__...__`). Shards written by other tools, or before the index existed, are walked once
to build the same array (`walk_index`).

Columns: `key` (str), `label` (the `cls` member as an integer; NO_LABEL without one, BAD_LABEL
when it is not an integer) and, per member extension EXT, `span:EXT` = [start, end) of its bytes
in the tar ([-1, -1] where a sample lacks it).
"""
from __future__ import annotations

import io
import mmap

import numpy as np

from dpt_scale.compat import SPURIOUS_AST_ERROR
from dpt_scale.errors import ShardError
from dpt_scale.shards.tar import BLOCK, TarFormatError, sample_spans

INDEX_MEMBER = "__index__"
NO_LABEL, BAD_LABEL = -1, -2


def parse_label(data: bytes | None) -> int:
    if data is None:
        return NO_LABEL
    try:
        return int(data)
    except ValueError:
        return BAD_LABEL


class IndexBuilder:
    """Collects a shard's samples as they are written (or walked) and packs them into an array."""

    def __init__(self):
        self.keys: list[str] = []
        self.labels: list[int] = []
        self.spans: dict[str, list[tuple[int, int]]] = {}

    def add(self, key: str, label: int, spans: dict[str, tuple[int, int]]) -> None:
        n = len(self.keys)
        for ext, span in spans.items():
            # an extension first seen now is absent from every earlier sample
            self.spans.setdefault(ext, [(-1, -1)] * n).append(span)
        for ext, column in self.spans.items():
            if len(column) == n:
                column.append((-1, -1))
        self.keys.append(key)
        self.labels.append(label)

    def array(self) -> np.ndarray:
        width = max((len(k) for k in self.keys), default=1)
        dtype = [("key", f"U{width}"), ("label", "i8")] + [(f"span:{e}", "i8", (2,)) for e in sorted(self.spans)]
        out = np.empty(len(self.keys), dtype=dtype)
        out["key"], out["label"] = self.keys, self.labels
        for ext, column in self.spans.items():
            out[f"span:{ext}"] = np.asarray(column, dtype=np.int64).reshape(-1, 2)
        return out

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.save(buf, self.array(), allow_pickle=False)
        return buf.getvalue()


def load_npy(data: bytes) -> np.ndarray:
    """A .npy array from its bytes; a spurious SystemError of Python 3.11's parser (compat.py) is
    retried, as the bytes are fine."""
    for attempt in range(3):
        try:
            return np.load(io.BytesIO(data), allow_pickle=False)
        except SystemError as exc:
            if SPURIOUS_AST_ERROR not in str(exc) or attempt == 2:
                raise


def read_index(path, mm: mmap.mmap, span: list[int], samples: int) -> np.ndarray:
    """The index stored in a shard at `span` (from its manifest entry); a ShardError if it is not
    there or does not fit the shard (a tar replaced after its manifest was written)."""
    start, end = span
    problem = None
    if end > len(mm) or start < BLOCK or mm[start - BLOCK:start - BLOCK + len(INDEX_MEMBER) + 1] != \
            INDEX_MEMBER.encode() + b"\0":
        problem = "the manifest's index member is not where it says"
    else:
        try:
            index = load_npy(mm[start:end])
        except ValueError as exc:
            problem = f"its index member does not load ({exc})"
        else:
            spans = [index[name] for name in index.dtype.names if name.startswith("span:")]
            if len(index) != samples:
                problem = f"its index lists {len(index)} samples, the manifest {samples}"
            elif any((s[:, 1] > start - BLOCK).any() or (s[:, 0] > s[:, 1]).any() for s in spans):
                problem = "its index points outside the samples' bytes"
    if problem:
        raise ShardError(f"{path}: {problem}; run `dpt-scale shards verify` on its set (the shard was "
                         "replaced or damaged; re-create the set)")
    return index


def walk_index(path, mm: mmap.mmap) -> tuple[np.ndarray, TarFormatError | None]:
    """The index of a shard without one, by walking its headers: the samples up to the first
    fault, and that fault (None for a sound shard)."""
    builder = IndexBuilder()
    try:
        for key, _, spans in sample_spans(str(path), mm, len(mm)):
            cls = spans.get("cls")
            builder.add(key, NO_LABEL if cls is None else parse_label(mm[cls[0]:cls[1]]), spans)
    except TarFormatError as exc:
        return builder.array(), exc  # the sample being read when it failed is dropped
    return builder.array(), None
