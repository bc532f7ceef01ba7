"""Turning one source image (a file or an array) into the encoded bytes stored in a shard.

Runs in import worker processes, so everything here is a plain picklable function.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

PIL_FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}
MODES = {1: "L", 3: "RGB"}


@dataclass(frozen=True)
class EncodeSettings:
    format: str = "png"  # png | jpg | webp
    channels: int = 3
    image_size: int | None = None  # shorter side resized to this, then a centre square crop
    quality: int = 95


@dataclass(frozen=True)
class Encoded:
    key: str
    data: bytes
    label: int | None  # None: an unlabelled sample
    shape: tuple[int, int, int]  # (C, H, W)


@dataclass(frozen=True)
class Unreadable:
    key: str
    source: str
    reason: str


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """The usual ImageNet preparation (as in ADM and U-ViT): the central square, resized to
    size x size with a box reduction first for large factors (PIL's reducing_gap) then bicubic."""
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) / 2, (h - side) / 2
    return img.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side),
                      reducing_gap=2.0)


def encode_pil(img: Image.Image, s: EncodeSettings) -> tuple[bytes, tuple[int, int, int]]:
    mode = MODES[s.channels]
    if img.mode != mode:
        img = img.convert(mode)
    if s.image_size is not None:
        img = resize_center_crop(img, s.image_size)
    buf = io.BytesIO()
    options = {} if s.format == "png" else {"quality": s.quality}
    img.save(buf, format=PIL_FORMATS[s.format], **options)
    return buf.getvalue(), (s.channels, img.height, img.width)


def encode_array(item: tuple[str, np.ndarray, int], s: EncodeSettings) -> Encoded:
    key, array, label = item
    data, shape = encode_pil(Image.fromarray(array), s)
    return Encoded(key, data, label, shape)


def encode_file(item: tuple[str, str, int], s: EncodeSettings) -> Encoded | Unreadable:
    key, path, label = item
    try:
        raw = Path(path).read_bytes()  # once: decoded below, and kept as is when no change is needed
    except OSError as exc:
        return Unreadable(key, str(path), f"{type(exc).__name__}: {exc}")
    return encode_bytes(key, raw, label, s, str(path))


def encode_bytes(key: str, raw: bytes, label: int | None, s: EncodeSettings, origin: str) -> Encoded | Unreadable:
    """Decode an image fully (so that a damaged one is caught here, not in training) and encode it.
    A JPEG that needs no change keeps its original bytes: no second lossy compression. `origin`
    says where the bytes came from, for the report of an unreadable image."""
    try:
        with Image.open(io.BytesIO(raw)) as img:
            if s.image_size is not None and img.format == "JPEG":
                img.draft(MODES[s.channels], (s.image_size, s.image_size))  # DCT-domain downscale: fast
            img.load()
            if (img.format == "JPEG" and s.format == "jpg" and s.image_size is None
                    and img.mode == MODES[s.channels]):
                return Encoded(key, raw, label, (s.channels, img.height, img.width))
            data, shape = encode_pil(img, s)
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        return Unreadable(key, origin, f"{type(exc).__name__}: {exc}")
    return Encoded(key, data, label, shape)
