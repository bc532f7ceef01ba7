"""Encoded image bytes -> uint8 (C, H, W) tensor, or straight into a batch.

JPEG: simplejpeg (libjpeg-turbo, torchvision's pixels); PNG (8-bit gray, RGB, palette): libspng
through imagecodecs. Both decode into a batch's own memory, with no fixed per-call cost; what they
do not handle (other colour modes, 16-bit or alpha PNGs, WebP) and damaged files go to torchvision,
so that what counts as damage stays its call. Neither PNG decoder is safe on damaged bytes (one
crashes the process, the other decodes wrong pixels silently), and every image was decoded by PIL
when written, so chunk CRCs are checked before any decoder sees the bytes. We call the op that
`torchvision.io.decode_image` wraps, without its per-call logging. Figures: docs/shards.md.
"""
from __future__ import annotations

import struct
import zlib

import imagecodecs
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


class BatchDecodeError(ImageDecodeError):
    """Image `index` of a batch does not decode, or (`shape` set: its (C, H, W)) is of another size."""

    def __init__(self, index: int, problem: str, shape: tuple[int, ...] | None = None):
        super().__init__(problem)
        self.index, self.shape = index, shape


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
    """(C, H, W) when every image of a set is a JPEG or PNG of that one size (a manifest's `image`
    entry says so), so that a reader can decode them straight into a batch; else None."""
    if image["field"] in ("jpg", "jpeg", "png") and image["size"]:
        return (image["channels"], *image["size"])
    return None


def decode_into(data: bytes, out: np.ndarray) -> bool:
    """Decode a JPEG or PNG straight into `out`, a C-contiguous (H, W, C) uint8 array. False when
    it cannot (another format or size, a colour mode to convert, damage): decode it with
    `decode_image` then, which also tells damage apart."""
    return decode_all_into([data], [out])


def decode_all_into(blobs: list, out: np.ndarray | list[np.ndarray]) -> bool:
    """Decode same-format images straight into out[0], out[1], ... (C-contiguous (H, W, C) uint8
    arrays: a batch array, or a list of its images made once), but False at the first that cannot
    (then go one by one with `decode_into`).
    The readers' batch path: one list comprehension over the decoder, no wrapper call per image
    (at 28 or 64 px every us outside the decoder shows in the loader's speed, docs/benchmarks.md)."""
    if not blobs:
        return True
    head, shape = blobs[0][:8], out[0].shape
    try:
        if head[:2] == _JPEG_SIGNATURE:  # a smaller JPEG would fill only the start of its slot
            decode, mode = simplejpeg.decode_jpeg, _JPEG_MODES[shape[2]]
            return all([decode(data, mode, buffer=slot).shape == shape for data, slot in zip(blobs, out)])
        if head == _PNG_SIGNATURE and all([png_chunks_intact(data) for data in blobs]):
            decode = imagecodecs.spng_decode  # raises on another size or colour mode, or a non-PNG
            [decode(data, out=slot) for data, slot in zip(blobs, out)]
            return True
    except (ValueError, RuntimeError):  # RuntimeError: imagecodecs' SpngError
        pass
    return False


def decode_batch_into(blobs: list, out: np.ndarray) -> None:
    """Decode same-size images into `out`, (N, H, W, C) uint8: straight into it where the decoders
    can, else one by one (another format or colour mode), so that the one at fault is named."""
    if decode_all_into(blobs, out):
        return
    for i, (data, slot) in enumerate(zip(blobs, out)):
        if decode_into(data, slot):
            continue
        try:
            image = decode_image(data, slot.shape[2])
        except ImageDecodeError as exc:
            raise BatchDecodeError(i, str(exc)) from None
        if tuple(image.shape[1:]) != slot.shape[:2]:
            raise BatchDecodeError(i, "another size", tuple(image.shape))
        slot[...] = image.permute(1, 2, 0).numpy()


def decode_image(data: bytes, channels: int) -> torch.Tensor:
    """Decode PNG/JPEG/WebP bytes to a (channels, H, W) uint8 tensor, converting the colour mode."""
    return decode_images([data], channels)[0]


def decode_images(blobs: list, channels: int) -> list[torch.Tensor]:
    """`decode_image` over a list, with every PNG's chunk check done first, in a pass of its own:
    interleaved with calls into libpng the check's Python loop runs at half speed (28 px MNIST
    PNGs: 1.33x the images/s of one by one; docs/shards.md). The first image that does not
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
    if data[:8] == _PNG_SIGNATURE and _spng_gives(data, channels):
        try:
            image = imagecodecs.spng_decode(data)
            return torch.from_numpy(image[np.newaxis] if channels == 1 else image.transpose(2, 0, 1))
        except RuntimeError:
            pass  # torchvision below: damage that it reports
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


def _spng_gives(png: bytes, channels: int) -> bool:
    """Whether libspng decodes this PNG to the 8-bit image wanted, read from its header (bit depth,
    then colour type: gray for 1 channel, RGB or palette for 3), so that an image it would decode
    in another mode goes to torchvision's conversion without being decoded twice."""
    return png[24] <= 8 and png[25] in ((0,) if channels == 1 else (2, 3))
