"""A shard's sample index: each sample's key, label and where each of its members lies.

Our writer stores it as the shard's last member, `__index__` (a .npy structured array), and the
manifest records where that member's bytes are. A reader then finds every sample with one array
lookup instead of walking the tar's headers: the walk costs ~5 us per sample in Python, a fifth
of decoding a 28x28 PNG, and the loader's batches are built with array operations from the index
(docs/shards.md). The member stays inside the tar, so copying a shard copies its index and
the shard's checksum covers it; stock `tar` lists it and stock webdataset skips it as metadata
(names `__...__`). Shards written by other tools, or before the index existed, are walked once
to build the same array (`walk_index`).

Columns: `key` (str), `label` (the `cls` member as an integer; NO_LABEL without one, BAD_LABEL
when it is not an integer) and, per member extension EXT, `span:EXT` = [start, end) of its bytes
in the tar ([-1, -1] where a sample lacks it).
"""
from __future__ import annotations

import hashlib
import io
import mmap
from tokenize import TokenError

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
    retried, as the bytes are fine. Damage is a ValueError."""
    for attempt in range(3):
        try:
            return np.load(io.BytesIO(data), allow_pickle=False)
        except SystemError as exc:
            if SPURIOUS_AST_ERROR not in str(exc) or attempt == 2:
                raise
        except (SyntaxError, TokenError) as exc:  # numpy parses a damaged header as Python
            raise ValueError(f"its header does not parse ({exc})") from None
        except EOFError:
            raise ValueError("no array in it (empty)") from None


def read_index(path, mm: mmap.mmap, span: list[int], samples: int, sha256: str = "") -> np.ndarray:
    """The index stored in a shard at `span` (from its manifest entry, with the sha256 of its bytes
    where the manifest has one); a ShardError if it is not there, damaged, or does not fit the
    shard (a tar replaced after its manifest was written). The checksum matters: readers take
    keys, labels and member positions from the index alone, so one flipped bit in it would
    otherwise read as another label or image."""
    start, end = span
    problem = None
    if end > len(mm) or start < BLOCK or mm[start - BLOCK:start - BLOCK + len(INDEX_MEMBER) + 1] != \
            INDEX_MEMBER.encode() + b"\0":
        problem = "the manifest's index member is not where it says"
    elif sha256 and hashlib.sha256(mm[start:end]).hexdigest() != sha256:
        problem = "its index member's sha256 differs from the manifest's (damaged)"
    else:
        try:
            index = load_npy(mm[start:end])
        except ValueError as exc:
            problem = f"its index member does not load ({exc})"
        else:
            if not _columns_fit(index):
                problem = f"its index member is not a table of keys, labels and spans ({index.dtype}, {index.shape})"
            elif len(index) != samples:
                problem = f"its index lists {len(index)} samples, the manifest {samples}"
            elif any((s[:, 1] > start - BLOCK).any() or (s[:, 0] > s[:, 1]).any() for s in _spans(index)):
                problem = "its index points outside the samples' bytes"
    if problem:
        raise ShardError(f"{path}: {problem}; run `dpt-scale shards verify` on its set (the shard was "
                         "replaced or damaged; re-create the set)")
    return index


def _spans(index: np.ndarray) -> list[np.ndarray]:
    return [index[name] for name in index.dtype.names if name.startswith("span:")]


def _columns_fit(index: np.ndarray) -> bool:
    """The columns IndexBuilder writes, of the kinds it writes them in."""
    names, dtype = index.dtype.names or (), index.dtype
    return (index.ndim == 1 and "key" in names and "label" in names and dtype["key"].kind == "U"
            and dtype["label"].kind == "i" and all(dtype[n].base.kind == "i" and dtype[n].shape == (2,)
                                                   for n in names if n.startswith("span:")))


def walk_index(path, mm: mmap.mmap) -> tuple[np.ndarray, TarFormatError | None]:
    """The index of a shard without one, by walking its headers: the samples up to the first
    fault, and that fault (None for a sound shard)."""
    builder = IndexBuilder()
    try:
        # headers checked: this walk is all a reader knows of the shard, so a flipped bit in a
        # name or type would read as another key, or a label lost
        for key, _, spans in sample_spans(str(path), mm, len(mm), check_headers=True):
            cls = spans.get("cls")
            builder.add(key, NO_LABEL if cls is None else parse_label(mm[cls[0]:cls[1]]), spans)
    except TarFormatError as exc:
        return builder.array(), exc  # the sample being read when it failed is dropped
    return builder.array(), None
