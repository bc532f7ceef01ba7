"""Reading the samples of one tar shard.

Written by hand instead of using `tarfile` (which webdataset uses): tarfile's stream reader costs
~45 us per member, more than decoding a 28x28 PNG, while unpacking the 512-byte headers straight
from a memory-mapped file costs a few us (docs/shards.md). It reads POSIX ustar, GNU long names
and pax `path`/`size` records, which covers what stock `tar`, Python's tarfile and webdataset write.

Samples follow webdataset's convention: consecutive members `KEY.EXT` form one sample, KEY is the
name up to the first dot of its last path component, names starting with `__` are metadata.
"""
from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterator

from dpt_scale.errors import ShardError

BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
# ustar header: name, (mode uid gid), size, (mtime chksum), typeflag, (linkname), magic, (...), prefix
_HEADER = struct.Struct("100s24x12s20xc100x6s82x155s")
_REGULAR = (b"0", b"\0", b"7")
_CONTROL = bytes(range(32)) + b"\x7f"


class TarFormatError(ShardError):
    """A shard that is truncated or not a valid tar; the message names the shard and the member."""

    def __init__(self, path: str, reason: str, member: str | None = None):
        self.path, self.reason, self.member = str(path), reason, member
        super().__init__(f"{path}: {reason}")


def _octal(field: bytes) -> int:
    if field[11:] == b"\0":  # the usual form, "%011o\0" (a third of the walk's time otherwise)
        try:
            return int(field[:11], 8)
        except ValueError:
            pass
    if field[:1] and field[0] & 0x80:  # GNU base-256 for sizes of 8 GiB and more
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _header_checksum_ok(header: bytes) -> bool:
    try:
        return _octal(header[148:156]) == sum(header[:148]) + 8 * 32 + sum(header[156:])
    except ValueError:  # not even a number
        return False


def open_map(path: str) -> tuple[mmap.mmap, int]:
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise ShardError(f"{path}: shard is missing") from None
    except IsADirectoryError:
        raise ShardError(f"{path}: a folder where the manifest lists a shard; restore the shard or re-create the set") \
            from None
    with f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise TarFormatError(path, "empty file (0 bytes), not a tar")
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), size


def walk_members(path: str, mm: mmap.mmap, size: int, check_headers: bool,
                 pos: int = 0) -> Iterator[tuple[bytes, int, int, int]]:
    """Yield (name, start, end, first) for every regular member from byte `pos` on: the name as raw
    bytes, its data mm[start:end], and `first`, where its first header (maybe a long-name or pax
    header) begins."""
    last = b""
    long_name = pax_name = pax_size = None
    first = pos
    while True:
        if pos + BLOCK > size:
            where = f"after member '{_shown(last)}'" if last else "at the start"
            raise TarFormatError(path, f"truncated: the archive ends {where} without an end-of-archive marker",
                                 _shown(last) or None)
        name, size_field, kind, magic, prefix = _HEADER.unpack_from(mm, pos)
        if name[:1] == b"\0" and mm[pos:pos + BLOCK] == _ZERO_BLOCK:
            return
        if check_headers and not _header_checksum_ok(mm[pos:pos + BLOCK]):
            raise _corrupt(path, pos, last)
        try:
            member_size = _octal(size_field) if pax_size is None else pax_size
        except ValueError:
            raise _corrupt(path, pos, last) from None
        if member_size < 0:  # (int() takes a sign) the walk would go back and round again, forever
            raise _corrupt(path, pos, last)
        pax_size = None
        name = name.partition(b"\0")[0]
        if magic == b"ustar\0" and prefix[:1] != b"\0":  # POSIX ustar keeps a path prefix here
            name = prefix.partition(b"\0")[0] + b"/" + name
        name = long_name or pax_name or name
        start = pos + BLOCK
        end = start + member_size
        if end > size:
            raise TarFormatError(path, f"truncated inside member '{_shown(name)}' "
                                       f"({member_size} bytes declared, {max(size - start, 0)} present)",
                                 _shown(name))
        pos = start + (member_size + BLOCK - 1) // BLOCK * BLOCK
        if kind in _REGULAR:
            long_name = pax_name = None
            last = name
            yield name, start, end, first
            first = pos
        elif kind == b"L":  # GNU: the data is the next member's name
            long_name = mm[start:end].partition(b"\0")[0]
        elif kind == b"x":  # pax extended header for the next member
            try:
                pax_name, pax_size = _pax(mm[start:end])
            except ValueError:
                raise TarFormatError(path, f"corrupt pax header at byte {start - BLOCK}") from None
        else:  # directories, links, global pax headers: not sample data
            long_name = pax_name = None
            first = pos


def _corrupt(path: str, pos: int, last: bytes) -> TarFormatError:
    return TarFormatError(path, f"corrupt tar header at byte {pos} (after member '{_shown(last)}')")


def _pax(data: bytes) -> tuple[bytes | None, int | None]:
    name = size = None
    while data:
        length, _, rest = data.partition(b" ")
        n = int(length)
        if not len(length) + 2 <= n <= len(data):  # "N key=value\n" is N bytes: else no progress, or none left
            raise ValueError(f"pax record length {n}")
        key, _, value = rest[: n - len(length) - 2].partition(b"=")
        if key == b"path":
            name = value
        elif key == b"size":
            size = int(value)
        data = data[n:]
    return name, size


def iter_samples(path: str | os.PathLike, start: int = 0, stop: int | None = None,
                 fields: frozenset[str] | None = None, check_headers: bool = False,
                 seek: tuple[int, int] = (0, 0)) -> Iterator[dict]:
    """Yield samples `start` to `stop` (indices within the shard) as dicts {"__key__": key,
    "__offset__": byte offset of its first member, ext: bytes}. `fields` limits which members are
    copied (all when None). `seek` = (index, byte offset) of a sample at or before `start` to walk
    from (see Manifest.seek). Raises TarFormatError naming the shard and member for a truncated or
    malformed shard."""
    path = str(path)
    mm, size = open_map(path)
    with mm:
        yield from _samples(path, mm, size, start, stop, fields, check_headers, seek)


def _samples(path, mm, size, start, stop, fields, check_headers, seek):
    for key, first, spans in sample_spans(path, mm, size, start, stop, check_headers, seek):
        sample = {"__key__": key, "__offset__": first}
        for ext, (begin, end) in spans.items():
            if fields is None or ext in fields:
                sample[ext] = mm[begin:end]
        yield sample


def sample_spans(path: str, mm: mmap.mmap, size: int, start: int = 0, stop: int | None = None,
                 check_headers: bool = False, seek: tuple[int, int] = (0, 0)
                 ) -> Iterator[tuple[str, int, dict[str, tuple[int, int]]]]:
    """Yield (key, first, {ext: (start, end)}) for samples `start` to `stop` of a mapped shard:
    where each member's data lies (mm[start:end]) and `first`, where the sample's first header
    begins. Arguments as for iter_samples."""
    (index, pos), key, spans, offset = seek, None, None, 0
    extensions: dict[bytes, str] = {}  # raw extension -> its lower-case text, decoded once
    index -= 1
    for name, begin, end, first in walk_members(path, mm, size, check_headers, pos):
        slash = name.rfind(b"/") + 1
        if name.startswith(b"__", slash):  # webdataset metadata (and our sample index)
            continue
        dot = name.find(b".", slash)
        k = name[:dot] if dot >= 0 else name
        if k != key:  # a new sample starts
            if spans is not None:
                yield _text(path, key), offset, spans
                spans = None
            key, index = k, index + 1
            if stop is not None and index >= stop:
                return
            if index >= start:
                spans, offset = {}, first
        if spans is not None:
            raw = name[dot + 1:] if dot >= 0 else b""
            ext = extensions.get(raw)
            if ext is None:
                ext = extensions[raw] = _text(path, name, raw).lower()
            if ext in spans:
                raise TarFormatError(path, f"member '{_shown(name)}' appears twice in a sample", _shown(name))
            spans[ext] = (begin, end)
    if spans is not None:
        yield _text(path, key), offset, spans


def _text(path: str, name: bytes, part: bytes | None = None) -> str:
    """`part` of a member name (all of it by default) as text. A name that is not UTF-8, or holds
    control characters, is damage (a header's bytes read as a name): keys and extensions must be
    text, and one line in a message."""
    part = name if part is None else part
    try:
        if len(part.translate(None, _CONTROL)) == len(part):
            return part.decode()
    except UnicodeDecodeError:
        pass
    raise TarFormatError(path, f"'{_shown(name)}' in a member name is not a line of UTF-8 text", _shown(name))


def _shown(name: bytes) -> str:
    """A member name for a message: one line, whatever its bytes."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in name.decode(errors="backslashreplace"))
