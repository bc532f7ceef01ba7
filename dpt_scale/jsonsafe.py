"""JSON as the standard defines it: Python's json writes NaN and Infinity, which other readers
refuse. A figure that could not be computed is written as null, with a warning saying where."""
from __future__ import annotations

import json
import logging
import math

log = logging.getLogger(__name__)


def finite(data, where: str = "", _path: str = ""):
    """`data` with every non-finite float replaced by None (warning once per key)."""
    if isinstance(data, float) and not math.isfinite(data):
        log.warning(f"{where or 'output'}: {_path or 'value'} is {data}, written as null")
        return None
    if isinstance(data, dict):
        return {k: finite(v, where, f"{_path}.{k}" if _path else str(k)) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite(v, where, f"{_path}[{i}]") for i, v in enumerate(data)]
    return data


def dumps(data, where: str = "", **kwargs) -> str:
    return json.dumps(finite(data, where), allow_nan=False, **kwargs)
