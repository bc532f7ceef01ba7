"""Encoding and writing generated images in the background, so the model never waits for I/O.

The sampling loop hands over uint8 batches; a small thread pool encodes them (Pillow's encoders
release the GIL) and one writer thread appends them, in order, to the current shard, which is
renamed into place when it ends (ShardWriter). The queue between them is bounded: memory holds a
few batches whatever the number of images, and a slow disk slows the sampler rather than filling RAM.
"""
from __future__ import annotations

import io
import queue
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from dpt_scale.shards.manifest import ShardEntry
from dpt_scale.shards.writer import ShardWriter

PIL_FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}


def encode_images(images: np.ndarray, fmt: str, quality: int) -> list[bytes]:
    """uint8 (N, H, W, C) -> encoded files; deterministic, so reruns write identical bytes."""
    options = {"compress_level": 6} if fmt == "png" else {"quality": quality}
    out = []
    for image in images:
        buf = io.BytesIO()
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format=PIL_FORMATS[fmt], **options)
        out.append(buf.getvalue())
    return out


class BackgroundShardWriter:
    """`put` batches of one shard, then `end_shard(on_done)`; `on_done(entry)` runs once the shard is
    complete under its final name. Use as a context manager: leaving with an exception discards a
    shard in progress (no final file, no temporary)."""

    def __init__(self, directory: Path, fmt: str, quality: int = 95, threads: int = 2, depth: int = 4):
        self.dir, self.fmt, self.quality = Path(directory), fmt, quality
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="encode")
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._drain, name="shard-writer", daemon=True)
        self.thread.start()

    def put(self, shard: str, samples: list[dict], images: np.ndarray) -> None:
        """`samples`: the fields of each image but the image itself (`__key__`, `cls`, `json`)."""
        self._raise()
        self.queue.put(("batch", shard, samples, self.pool.submit(encode_images, images, self.fmt, self.quality)))

    def end_shard(self, shard: str, on_done: Callable[[ShardEntry], None]) -> None:
        self._raise()
        self.queue.put(("end", shard, on_done, None))

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        self.pool.shutdown()
        self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def _drain(self) -> None:
        writer: ShardWriter | None = None
        while (item := self.queue.get()) is not None:
            if self.error is not None:
                continue  # keep taking items so that the producer never blocks on a dead writer
            kind, shard, payload, encoded = item
            try:
                if kind == "batch":
                    writer = writer or ShardWriter(self.dir / shard)
                    for fields, data in zip(payload, encoded.result()):
                        writer.write({**fields, self.fmt: data})
                else:
                    entry, writer = writer.close(), None
                    payload(entry)
            except BaseException as exc:  # handed to the sampling thread at its next call
                self.error = exc
                if writer is not None:
                    writer.abort()
                    writer = None
        if writer is not None:  # the producer stopped mid-shard (an exception): leave nothing behind
            writer.abort()

    def __enter__(self) -> "BackgroundShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.queue.put(None)
            self.thread.join()
            self.pool.shutdown(cancel_futures=True)
