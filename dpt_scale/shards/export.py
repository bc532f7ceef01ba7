"""`dpt-scale shards export`: a shard set as the files that FID tools outside this package read.

- `npz`: the sample batch of guided-diffusion's evaluator (the ADM suite that DiT and U-ViT report
  with): `arr_0`, uint8 (N, H, W, 3) RGB, grayscale repeated to 3 channels since the evaluator feeds
  it straight to Inception; `arr_1`, the int64 labels as guided-diffusion's sampler writes them
  (-1 where a sample has none; left out when no sample has one, as for an unconditional model).
  The evaluator streams `arr_0` out of the zip member, and a million 256 px images are 197 GB, so
  the array is never built here either: the .npy header (its shape is known from the manifest) and
  then the images, a chunk at a time, go straight into the zip member (stored, zip64), as
  `np.savez` would lay them out.
- `imagefolder`: one folder of PNGs per class (folder names from the manifest), or one flat folder;
  PNG members are copied byte for byte, other formats decoded and written as PNG.

Image i of the set (shards in manifest order, samples in shard order) is `arr_0[i]` and the file
`i.png` zero-padded, in both. Either output is written under a temporary name and renamed when
complete, so a killed export never leaves a finished-looking file.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.lib import format as npy
from tqdm import tqdm

from dpt_scale.errors import ShardError, UserError, check_writable
from dpt_scale.generation.writer import encode_images
from dpt_scale.shards.decode import (
    BatchDecodeError,
    ImageDecodeError,
    decode_batch_into,
    decode_image,
    png_chunks_intact,
)
from dpt_scale.shards.index import NO_LABEL
from dpt_scale.shards.manifest import Manifest
from dpt_scale.shards.rows import END, LABEL, START, shard_rows
from dpt_scale.shards.tar import open_map

log = logging.getLogger(__name__)
FORMATS = ("npz", "imagefolder")
CHUNK_BYTES = 32 * 2**20  # decoded images held at once (npz)
TMP_SUFFIX = ".tmp"
OURS = ".dpt-scale-export"  # marks a temporary folder as an unfinished export, safe to remove
_PNG = b"\x89PNG\r\n\x1a\n"


@dataclass
class Sample:
    data: bytes  # the encoded image
    label: int  # NO_LABEL where the sample has none
    key: str
    shard: Path

    def where(self, field: str) -> str:
        return f"{self.shard}: member '{self.key}.{field}'"


def export(directory: str | Path, to: str, out: str | Path, flat: bool = False) -> dict:
    """Write the shard set `directory` as `to` ("npz" or "imagefolder") at `out`; returns a summary."""
    directory, out = Path(directory), Path(out)
    if to not in FORMATS:
        raise UserError(f"unknown export format --to {to!r}; choose npz (the ADM evaluator's sample batch) "
                        "or imagefolder (PNG files, a folder per class)")
    if flat and to != "imagefolder":
        raise UserError("--flat is for --to imagefolder (an npz batch has no folders); leave it out")
    manifest = Manifest.load(directory)
    if manifest.num_samples == 0:
        raise UserError(f"{directory} is an empty shard set (0 samples): nothing to export")
    if manifest.image is None:
        raise UserError(f"{directory}: its samples have no image member (a set of latents or features?); "
                        "export a set of images")
    _check_target(out, to)
    start = time.perf_counter()
    write = _write_npz if to == "npz" else _write_imagefolder
    with tqdm(total=manifest.num_samples, desc=f"export {to}", unit="img", disable=None, mininterval=2) as progress:
        summary = write(directory, manifest, out, flat, progress)
    seconds = time.perf_counter() - start
    n = manifest.num_samples
    log.info(f"exported {n} images to {out} in {seconds:.1f}s ({n / max(seconds, 1e-9):.0f} images/s)")
    return {"images": n, "out": str(out), "seconds": seconds, **summary}


def _check_target(out: Path, to: str) -> None:
    """Refuse, before any work, a target that holds something else; clear an unfinished export's temporary."""
    what = "file" if to == "npz" else "folder (or an empty one)"
    if out.is_dir() and to == "npz":
        raise UserError(f"{out} is a folder; name a new file as OUT (e.g. {out / 'samples.npz'})")
    if out.is_dir() and any(out.iterdir()):
        shown = ", ".join(sorted(p.name for p in out.iterdir())[:3])
        raise UserError(f"{out} holds other files ({shown}); name a new {what} as OUT, or remove it first")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists; name a new {what} as OUT, or remove it first")
    tmp = _tmp(out)
    if tmp.is_dir() and not (tmp / OURS).is_file():
        raise UserError(f"{tmp} exists and is not an unfinished export; remove it, or name another OUT")
    check_writable(out.parent, "name another OUT")
    if tmp.is_dir():
        shutil.rmtree(tmp)  # left by a killed export
    else:
        tmp.unlink(missing_ok=True)


def _tmp(out: Path) -> Path:
    return out.with_name(out.name + TMP_SUFFIX)


def _chunks(directory: Path, manifest: Manifest, size: int) -> Iterator[list[Sample]]:
    """The set's samples in order, `size` at a time, read through the shards' sample indexes.
    A sample that cannot be read stops the export with a line naming it."""
    field = manifest.image["field"]
    for i, entry in enumerate(manifest.shards):
        try:
            mm, _ = open_map(str(directory / entry.name))
        except ShardError as exc:
            raise ShardError(f"{exc}; {_verify(directory)}") from None
        with mm:
            rows = shard_rows(manifest, directory, i, mm, field)
            if rows.bad is not None:
                raise ShardError(f"{rows.explain(int(np.flatnonzero(rows.bad)[0]))}; {_verify(directory)}")
            labels = rows.table[:, LABEL]
            beyond = np.flatnonzero(labels >= manifest.num_classes)
            if len(beyond):
                raise ShardError(f"{rows.path}: sample '{rows.keys[beyond[0]]}' has class {labels[beyond[0]]}, but "
                                 f"the manifest names {manifest.num_classes} classes; {_verify(directory)}")
            keys, labels = rows.keys.tolist(), labels.tolist()
            starts, ends = rows.table[:, START].tolist(), rows.table[:, END].tolist()
            for at in range(0, len(keys), size):
                yield [Sample(mm[a:b], label, key, rows.path) for key, label, a, b in
                       zip(keys[at:at + size], labels[at:at + size], starts[at:at + size], ends[at:at + size])]


def _verify(directory: Path) -> str:
    return f"run `dpt-scale shards verify {directory}` to list every fault, then restore or re-import the set"


def _undecodable(sample: Sample, field: str, exc: Exception | str, directory: Path) -> ShardError:
    return ShardError(f"{sample.where(field)} does not decode ({exc}); {_verify(directory)}")


# ---------------------------------------------------------------- npz

def _write_npz(directory: Path, manifest: Manifest, out: Path, flat: bool, progress: tqdm) -> dict:
    size, field = manifest.image["size"], manifest.image["field"]
    if not size:
        raise UserError(f"{directory} holds images of several sizes ({manifest.image['min_size']} to "
                        f"{manifest.image['max_size']}), but an npz batch is one array; export --to imagefolder, "
                        "or import the images with --image-size")
    n, (h, w), channels = manifest.num_samples, size, manifest.image["channels"]
    labelled = manifest.unlabelled < n
    labels = np.full(n, NO_LABEL, dtype=np.int64)  # 8 bytes an image: the one thing kept whole
    chunk = max(1, CHUNK_BYTES // (h * w * max(channels, 3)))
    buffer = np.empty((chunk, h, w, channels), dtype=np.uint8)
    tmp, at = _tmp(out), 0
    try:
        # ZIP_STORED as np.savez writes it: the evaluator reads arr_0 in batches straight from the member.
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as f:
                _npy_header(f, (n, h, w, 3), np.uint8)
                for part in _chunks(directory, manifest, chunk):
                    images = _decode_chunk(part, buffer[:len(part)], field, directory)
                    f.write(np.repeat(images, 3, axis=3) if channels == 1 else images)
                    labels[at:at + len(part)] = [s.label for s in part]
                    at += len(part)
                    progress.update(len(part))
            if labelled:
                with zf.open("arr_1.npy", "w", force_zip64=True) as f:
                    _npy_header(f, (n,), np.int64)
                    f.write(labels)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {"format": "npz", "shape": [n, h, w, 3], "labels": bool(labelled)}


def _npy_header(f, shape: tuple[int, ...], dtype) -> None:
    """The header `np.save` writes for a C-ordered array of this shape; the data follows as raw bytes."""
    npy.write_array_header_1_0(f, {"descr": npy.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                                   "shape": shape})


def _decode_chunk(part: list[Sample], out: np.ndarray, field: str, directory: Path) -> np.ndarray:
    """Decode same-size images into `out` (n, H, W, C), naming the sample at fault."""
    try:
        decode_batch_into([s.data for s in part], out)
    except BatchDecodeError as exc:
        sample = part[exc.index]
        if exc.shape is None:
            raise _undecodable(sample, field, exc, directory) from None
        raise ShardError(f"{sample.where(field)} is {exc.shape[2]}x{exc.shape[1]}, but the manifest says every "
                         f"image is {out.shape[2]}x{out.shape[1]}; {_verify(directory)}") from None
    return out


# ---------------------------------------------------------------- imagefolder

def _write_imagefolder(directory: Path, manifest: Manifest, out: Path, flat: bool, progress: tqdm) -> dict:
    n, field, channels = manifest.num_samples, manifest.image["field"], manifest.image["channels"]
    if not flat and manifest.unlabelled:
        raise UserError(f"{directory}: {manifest.unlabelled} of {n} samples have no label, so they have no class "
                        "folder; pass --flat to write every image into OUT itself")
    folders = {} if flat else {c: _folder_name(name, directory) for c, name in enumerate(manifest.classes)
                               if manifest.class_histogram[c]}
    width = len(str(n - 1))
    tmp, at = _tmp(out), 0
    try:
        tmp.mkdir()
        (tmp / OURS).touch()
        for name in folders.values():
            (tmp / name).mkdir()
        for part in _chunks(directory, manifest, 256):
            for sample in part:
                folder = tmp / folders[sample.label] if folders else tmp
                (folder / f"{at:0{width}d}.png").write_bytes(_png(sample, field, channels, directory))
                at += 1
            progress.update(len(part))
        (tmp / OURS).unlink()
        os.replace(tmp, out)  # onto an empty folder too: rename(2) replaces one
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"format": "imagefolder", "folders": len(folders)}


def _folder_name(name: str, directory: Path) -> str:
    if not name.strip() or name in (".", "..") or "/" in name or "\0" in name or name == OURS:
        raise UserError(f"{directory}: class name {name!r} cannot be a folder name; pass --flat to write every "
                        "image into OUT itself")
    return name


def _png(sample: Sample, field: str, channels: int, directory: Path) -> bytes:
    """The sample's PNG as stored, or its image (JPEG, WebP) written as one."""
    if sample.data[:8] == _PNG:
        if not png_chunks_intact(sample.data):
            raise _undecodable(sample, field, "damaged PNG: chunk CRC mismatch or truncated", directory)
        return sample.data
    try:
        image = decode_image(sample.data, channels)
    except ImageDecodeError as exc:
        raise _undecodable(sample, field, exc, directory) from None
    return encode_images(image.permute(1, 2, 0).numpy()[np.newaxis], "png", 95)[0]
