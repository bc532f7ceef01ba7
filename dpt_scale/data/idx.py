"""Reading IDX files, the format of MNIST and its family (Fashion-MNIST, KMNIST, ...).

A magic number (two zero bytes, a type code, the number of dimensions), the dimensions as
big-endian uint32, then the data in C order; optionally gzip-compressed.
"""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from dpt_scale.errors import UserError

_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"IDX file not found: {path}; give the IMAGES and LABELS files, e.g. "
                        "train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz")
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    try:
        with (gzip.open if gzipped else open)(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise UserError(f"{path}: cannot read ({exc})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _TYPES:
        raise UserError(f"{path}: not an IDX file (bad magic number); expected e.g. train-images-idx3-ubyte[.gz]")
    ndim = data[3]
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_TYPES[data[2]])
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(data) - offset != expected:
        raise UserError(f"{path}: IDX header promises {dims} values ({expected} bytes) but the file holds "
                        f"{len(data) - offset}; the file is truncated or damaged")
    return np.frombuffer(data, dtype=dtype, offset=offset).reshape(dims).astype(dtype.newbyteorder("="))
