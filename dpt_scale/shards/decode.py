"""Encoded image bytes -> uint8 (C, H, W) tensor.

JPEG: simplejpeg (libjpeg-turbo; the pixels of torchvision's decoder, tested: the same for YCbCr
and grayscale JPEGs, within one level for CMYK ones, which it converts by another formula). It has no
fixed ~20 us cost per call (a 64 px JPEG: 31 us against 51 us) and decodes straight into a batch
(`decode_jpeg_into`), which saves copying each image into it (about 40 us at 256 px); see
docs/benchmarks.md. Colour spaces TurboJPEG does not convert and damaged files fall
back to torchvision, so that what counts as damage stays torchvision's call.

PNG and WebP: torchvision's decoders (libpng/libwebp), 2-3x faster than PIL on small images. Its
PNG decoder crashes the process on a damaged file instead of raising (pytorch/vision#3613,
reproduced with torchvision 0.29: one flipped byte in IDAT -> SIGSEGV). Every image in our shards
was decoded by PIL when it was written, so damage since then shows up as a PNG chunk CRC mismatch:
we check the CRCs (~4 us; a batch's all in one pass, `decode_images`) before libpng sees the
bytes. The JPEG and WebP decoders raise on damage. `dpt-scale shards verify` decodes with PIL
instead, as a second opinion.

We call the op that `torchvision.io.decode_image` wraps: the wrapper's usage logging and
deprecation warning cost ~15 us a call, half the cost of decoding a 28x28 PNG. (torchvision 0.29
deprecates its decoders in favour of TorchCodec; we pin torchvision exactly, and TorchCodec 0.17
measured slower on small images, see docs/benchmarks.md. Switching touches only this function.)
"""
from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable

import numpy as np
import simplejpeg
import torch
from torchvision.io import ImageReadMode  # importing torchvision.io registers torch.ops.image
from torchvision.transforms.v2.functional import rgb_to_grayscale

_MODES = {1: ImageReadMode.GRAY, 3: ImageReadMode.RGB}
_JPEG_MODES = {1: "GRAY", 3: "RGB"}
_JPEG_SIGNATURE = b"\xff\xd8"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_u32 = struct.Struct(">I").unpack_from


class ImageDecodeError(ValueError):
    pass


def png_chunks_intact(data: bytes) -> bool:
    """True when `data` is a PNG whose every chunk, up to IEND, matches its CRC."""
    view, pos, size = memoryview(data), 8, len(data)
    while pos + 12 <= size:
        (length,) = _u32(data, pos)
        end = pos + 12 + length
        if end > size or zlib.crc32(view[pos + 4:end - 4]) != _u32(data, end - 4)[0]:
            return False
        if data[pos + 4:pos + 8] == b"IEND":
            return True
        pos = end
    return False


def in_place_shape(image: dict) -> tuple[int, int, int] | None:
    """(C, H, W) when every image of a set is a JPEG of that one size (a manifest's `image` entry
    says so), so that a reader can decode them straight into a batch; else None."""
    if image["field"] in ("jpg", "jpeg") and image["size"]:
        return (image["channels"], *image["size"])
    return None


def decode_jpeg_into(data: bytes, out: np.ndarray) -> bool:
    """Decode a JPEG straight into `out`, a C-contiguous (H, W, C) uint8 array. False when it
    cannot (not a JPEG, another size, a colour space TurboJPEG does not convert, damage): decode
    it with `decode_image` then, which also tells damage apart."""
    if data[:2] != _JPEG_SIGNATURE:
        return False
    try:
        # A smaller image would fill only the start of `out`; the shape tells.
        return simplejpeg.decode_jpeg(data, _JPEG_MODES[out.shape[2]], buffer=out).shape == out.shape
    except ValueError:
        return False


def decode_jpegs_into(blobs: Iterable[bytes], out: np.ndarray) -> bool:
    """Decode JPEGs straight into out[0], out[1], ... (a C-contiguous (B, H, W, C) uint8 array), as
    `decode_jpeg_into` one by one, but False at the first that cannot (then go one by one).
    The readers' batch path: no wrapper call per image (a 64 px JPEG decodes in ~33 us, and every
    us outside the decoder shows: 2% of the training loader's speed at 64 px, docs/benchmarks.md)."""
    decode, mode, shape = simplejpeg.decode_jpeg, _JPEG_MODES[out.shape[3]], out.shape[1:]
    try:  # a non-JPEG raises ValueError as well; a smaller JPEG fills only the start of its slot
        return all([decode(data, mode, buffer=slot).shape == shape for data, slot in zip(blobs, out)])
    except ValueError:
        return False


def decode_image(data: bytes, channels: int) -> torch.Tensor:
    """Decode PNG/JPEG/WebP bytes to a (channels, H, W) uint8 tensor, converting the colour mode."""
    return decode_images([data], channels)[0]


def decode_images(blobs: list, channels: int) -> list[torch.Tensor]:
    """`decode_image` over a list, with every PNG's chunk check done first, in a pass of its own:
    interleaved with calls into libpng the check's Python loop runs at half speed (28 px MNIST
    PNGs: 1.33x the images/s of one by one; docs/benchmarks.md). The first image that does not
    decode raises ImageDecodeError; `decode_image` one by one tells which it is."""
    if not all([png_chunks_intact(data) for data in blobs if data[:8] == _PNG_SIGNATURE]):
        raise ImageDecodeError("damaged PNG (chunk CRC mismatch or truncated)")
    return [_decode_intact(data, channels) for data in blobs]


def _decode_intact(data: bytes, channels: int) -> torch.Tensor:
    """`decode_image` for bytes that are not a PNG, or a PNG whose chunks are intact."""
    if data[:2] == _JPEG_SIGNATURE:
        try:  # a (C, H, W) view of (H, W, C) memory, as torchvision's decoders give
            # (numpy's transpose, then from_numpy: half the cost of torch's permute)
            return torch.from_numpy(simplejpeg.decode_jpeg(data, _JPEG_MODES[channels]).transpose(2, 0, 1))
        except ValueError:
            pass  # torchvision below: another colour space, or damage that it reports
    try:
        # bytearray: torch.frombuffer wants a writable buffer (the copy is tiny next to decoding).
        mode = _MODES[3] if data[8:12] == b"WEBP" else _MODES[channels]  # libwebp has no grayscale mode
        image = torch.ops.image.decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode.value, False)
    except (RuntimeError, ValueError) as exc:
        raise ImageDecodeError(str(exc).strip().splitlines()[-1][-200:] or type(exc).__name__) from None
    if image.shape[0] != channels:
        image = image[:3]
        image = rgb_to_grayscale(image) if channels == 1 else image.expand(3, -1, -1).contiguous()
    return image
