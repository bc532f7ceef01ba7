"""Data throughput, all in one run on the same images:

  (a) decode only: our decoder over the encoded bytes held in memory (the limit of any reader),
      in-process and inside 1 and 2 DataLoader worker processes (the limit per worker; a worker
      hands over as many batches per DataLoader item as our loader does),
  (a') batch floor: the same bytes decoded into their places in a batch buffer, in order, as our
       loader fills a batch (what a loader with no work of its own besides decoding would reach),
  (b) our shard loader (dpt_scale.shards.loader.ShardLoader), 0 / 1 / 2 worker processes,
  (c) torchvision ImageFolder + DataLoader over the same images as files, 1 / 2 workers,
plus import throughput (`dpt-scale data import`) and, for context, PIL, torchvision's public
decode_image and (if installed) TorchCodec on the same bytes.

Goals: (b) >= 0.9 x (a) per worker, and (b) >= 2 x (c). Every process decodes on one thread, as
dataloader workers do. Rates are taken in short windows (~WINDOW_S of the decode loop), round after
round; each window of a reader is paired with a window of (a), in as many processes, run just
before it, and a ratio is the median of those pairs: the host's drift hits both sides alike.
Loaders are timed as a long training run sees them: epoch after epoch, from the 13th batch on,
once the workers run and the batch buffers exist; the time to the first batch is reported apart.

    python bench/data_throughput.py [--quick] [--json results.json]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import imagecodecs  # noqa: E402
import numpy as np  # noqa: E402
import simplejpeg  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader, IterableDataset, get_worker_info  # noqa: E402
from torchvision import datasets, transforms  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine  # noqa: E402

from dpt_scale.cli import main as cli  # noqa: E402
from dpt_scale.recipe.schema import Loader  # noqa: E402
from dpt_scale.shards.batchpool import BatchPool  # noqa: E402
from dpt_scale.shards.decode import decode_all_into, png_chunks_intact  # noqa: E402
from dpt_scale.shards.loader import ShardLoader  # noqa: E402
from dpt_scale.shards.manifest import Manifest  # noqa: E402
from dpt_scale.shards.tar import iter_samples  # noqa: E402

BATCH = 256
WINDOW_S = 0.4  # seconds of the decode loop per timed window
# Batches read before a loader's timing starts: by then every pooled batch buffer of ours exists
# (a 256 px batch buffer's first fill costs ~12 ms more than a refill (page faults), once per buffer in a whole run).
WARMUP = 12


def photo_like(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth colour fields with mild noise: JPEG sizes and decode times like real photos."""
    coarse = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC), dtype=np.int16)
    return np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)


def make_folder(root: Path, n: int, size: int, classes: int = 10) -> None:
    rng = np.random.default_rng(size)
    for i in range(n):
        directory = root / f"class{i % classes}"
        directory.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo_like(rng, size)).save(directory / f"img{i:06d}.jpg", quality=90)


def mnist_files(shards: Path, root: Path) -> None:
    """The MNIST shards' PNG bytes as class-per-folder files (identical bytes for (b) and (c))."""
    manifest = Manifest.load(shards)
    for entry in manifest.shards:
        for s in iter_samples(shards / entry.name):
            directory = root / manifest.classes[int(s["cls"])]
            directory.mkdir(parents=True, exist_ok=True)
            (directory / f"{s['__key__']}.png").write_bytes(s["png"])


def timed_import(args: list[str]) -> float:
    start = time.perf_counter()
    assert cli(["-q", "data", "import", *args]) == 0
    return time.perf_counter() - start


def gray_loader(path: str) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("L")


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class Batches:
    """An endless source of batches from a DataLoader-like iterator; `window(k)` times k batches.
    Before each window, the batches the workers prefetched while the source stood idle are taken
    untimed: by then every worker has a new task, so the window sees the steady rate."""

    def __init__(self, batches, prefetched: int):
        self.batches, self.prefetched = batches, prefetched
        start = time.perf_counter()
        next(self.batches)
        self.startup = time.perf_counter() - start  # the wait for the first batch
        for _ in islice(self.batches, WARMUP - 1):  # every worker running, every batch buffer made
            pass

    def window(self, k: int) -> float:
        for _ in islice(self.batches, self.prefetched):
            pass
        start = time.perf_counter()
        for _ in islice(self.batches, k):
            pass
        seconds = time.perf_counter() - start
        # Each worker still has two batches to make: let it finish them before the next window
        # (of another source) starts, or it would slow that one down.
        time.sleep(1.2 * self.prefetched * seconds / k + 0.02)
        return seconds

    def close(self) -> None:
        if hasattr(self.batches, "close"):
            self.batches.close()


def _epochs(dl: DataLoader):
    while True:
        yield from dl


def decode_only(blobs: list, out: np.ndarray) -> None:
    """The limit: our decoder over encoded bytes in memory, nothing else, into one reused (H, W, C)
    array, as fast as the decoder goes (a fresh 256 px output per image costs page faults). PNGs
    are checked a batch at a time first, as the loader does (`decode_all_into`: the batch's chunk
    CRCs in one pass, then libspng)."""
    if blobs[0][:2] == b"\xff\xd8":
        decode, mode = simplejpeg.decode_jpeg, "GRAY" if out.shape[2] == 1 else "RGB"
        [decode(b, mode, buffer=out) for b in blobs]
    else:
        for at in range(0, len(blobs), BATCH):
            part = blobs[at:at + BATCH]
            assert all([png_chunks_intact(b) for b in part])
            [imagecodecs.spng_decode(b, out=out) for b in part]


class _DecodeOnly(IterableDataset):
    """The decode loop inside a DataLoader worker: each item is `bundle` batches' worth of images
    decoded (the worker's share of the set, cycling), as many as our loader hands over in one item,
    so that both pay DataLoader's cost per item alike; only the counts cross over."""

    def __init__(self, blobs: list, out_shape: tuple[int, int, int], bundle: int):
        self.blobs, self.out_shape, self.bundle = blobs, out_shape, bundle

    def __iter__(self):
        info = get_worker_info()
        mine = self.blobs[info.id::info.num_workers] if info else self.blobs
        out = np.empty(self.out_shape, dtype=np.uint8)
        while True:
            for i in range(0, len(mine) - self.bundle * BATCH + 1, self.bundle * BATCH):
                decode_only(mine[i:i + self.bundle * BATCH], out)
                yield [BATCH] * self.bundle


def _each(items):
    """Bundled items, one batch (count) at a time."""
    for item in items:
        yield from item


class Decoding:
    """An in-process decode loop as an endless source: `window(k)` runs it over the next k batches'
    worth of images, cycling through the set."""

    def __init__(self, per_image, blobs: list):
        self.per_image, self.blobs, self.at = per_image, blobs, 0

    def window(self, k: int) -> float:
        n = len(self.blobs)
        part = [self.blobs[(self.at + i) % n] for i in range(k * BATCH)]
        self.at = (self.at + k * BATCH) % n
        start = time.perf_counter()
        self.per_image(part)
        return time.perf_counter() - start


def measure(name: str, shards: Path, files: Path, channels: int, rounds: int, import_rate: dict) -> dict:
    manifest = Manifest.load(shards)
    field = manifest.image["field"]
    blobs = [s[field] for e in manifest.shards for s in iter_samples(shards / e.name, fields=frozenset({field}))]
    n = len(blobs)
    mode = "GRAY" if channels == 1 else "RGB"

    def pil(part):
        for b in part:
            with Image.open(io.BytesIO(b)) as img:
                np.asarray(img.convert("L" if channels == 1 else "RGB"))

    def tv_public(part):
        from torchvision.io import ImageReadMode
        from torchvision.io import decode_image as tv_decode
        for b in part:
            tv_decode(torch.frombuffer(bytearray(b), dtype=torch.uint8), mode=ImageReadMode[mode])

    hw = manifest.image["size"]
    one_image = np.empty((*hw, channels), dtype=np.uint8)

    def torchcodec_loop(part):
        from torchcodec.decoders import decode_image as tc_decode
        for b in part:
            tc_decode(b, mode=mode)

    # The most a loader written in Python can reach: every image decoded into its place in a batch
    # buffer as our loader does, from bytes already in memory and in order; no tar walk, shuffle,
    # labels, keys or hand-over to another process. The batch comes from a BatchPool, so that it
    # has the loader's layout in memory (channels last, OFFSET bytes into its buffer).
    batch = BatchPool(1, shared=False).take(0, (BATCH, channels, *hw), torch.uint8, channels > 1)[0]
    hwc = list(batch.permute(0, 2, 3, 1).numpy())  # each image's array, made once as the loader does

    def batch_floor(part):
        for at in range(0, len(part), BATCH):
            images = part[at:at + BATCH]
            assert decode_all_into(images, hwc)

    sources = {"decode_limit": Decoding(lambda part: decode_only(part, one_image), blobs),
               "batch_floor": Decoding(batch_floor, blobs), "pil_decode": Decoding(pil, blobs),
               "torchvision_public_decode": Decoding(tv_public, blobs)}
    try:
        import torchcodec  # noqa: F401  (optional: measured when installed)
        sources["torchcodec_decode"] = Decoding(torchcodec_loop, blobs)
    except ImportError:
        pass
    # Loaders read epoch after epoch, as training does (ours: one endless stream of batches).
    bundle = {}
    for workers in (0, 1, 2):
        loader = ShardLoader(shards, BATCH, world_size=1, rank=0, settings=Loader(workers=workers, streams=24))
        bundle[workers] = loader.bundle  # batches a worker hands over in one DataLoader item
        sources[f"ours_{workers}w"] = Batches(loader.batches(0), prefetched=2 * workers * loader.bundle)
    # The decode loop run in 1 and 2 DataLoader workers: what a worker can decode while the main
    # process is active too (on this VM, any work on the second vCPU slows the first, by up to a sixth).
    for workers in (1, 2):
        dl = DataLoader(_DecodeOnly(blobs, one_image.shape, bundle[workers]), batch_size=None, num_workers=workers)
        sources[f"decode_limit_{workers}w"] = Batches(_each(dl), prefetched=2 * workers * bundle[workers])
    folder = datasets.ImageFolder(files, transform=transforms.PILToTensor(),
                                  loader=gray_loader if channels == 1 else datasets.folder.pil_loader)
    for workers in (1, 2):
        dl = DataLoader(folder, batch_size=BATCH, shuffle=True, num_workers=workers, drop_last=True,
                        persistent_workers=True)
        sources[f"imagefolder_{workers}w"] = Batches(_epochs(dl), prefetched=2 * workers)
    # A window is ~WINDOW_S of the decode loop, and at least 8 batches.
    k = max(8, round(WINDOW_S * 8 / sources["decode_limit"].window(8)))
    # Each window of a reader is paired with a window of the decode loop in as many processes run
    # just before it, so that the host's drift (this shared machine's speed moves by tens of percent
    # within minutes) hits both alike; a ratio is the median of the pairs' ratios.
    reference = {"ours_1w": "decode_limit_1w", "ours_2w": "decode_limit_2w"}
    pairs = {key: [] for key in sources if key != "decode_limit"}
    rates = {key: [] for key in sources}
    keys = list(pairs)
    for r in range(rounds):
        for key in keys[r % len(keys):] + keys[:r % len(keys)]:  # each round starts one further on
            ref = reference.get(key, "decode_limit")
            a = k * BATCH / sources[ref].window(k)
            b = k * BATCH / sources[key].window(k)
            rates[ref].append(a)
            rates[key].append(b)
            pairs[key].append(b / a)

    def parse_all() -> int:
        return sum(1 for e in manifest.shards for _ in iter_samples(shards / e.name))

    tar_parse = statistics.median(n / timed(parse_all) for _ in range(3))
    startup = {key: round(s.startup * 1e3, 1) for key, s in sources.items()
               if isinstance(s, Batches) and not key.startswith("decode")}
    for s in sources.values():
        if isinstance(s, Batches):
            s.close()
    median = lambda key: statistics.median(rates[key])  # noqa: E731
    ratio = lambda key, per=1: statistics.median(pairs[key]) / per  # noqa: E731
    result = {"name": name, "images": n, "image": manifest.image, "mean_bytes": int(np.mean([len(b) for b in blobs])),
              "window_batches": k, "rounds": rounds, "batches_per_item": {f"{w}w": bundle[w] for w in (1, 2)},
              "rates": {key: round(median(key)) for key in rates} | {"tar_parse_only": round(tar_parse)},
              "import": import_rate, "startup_ms": startup,
              "pairs": {key: [round(r, 3) for r in v] for key, v in pairs.items()},
              "ratios": {"batch_floor / decode_limit": ratio("batch_floor"),
                         "decode_limit_1w / decode_limit": ratio("decode_limit_1w"),
                         "ours_0w / decode_limit": ratio("ours_0w"),
                         "ours_1w / decode_limit_1w": ratio("ours_1w"),
                         "ours_2w / decode_limit_2w": ratio("ours_2w"),
                         "ours_1w / decode_limit": median("ours_1w") / median("decode_limit"),
                         "ours_2w / 2 / decode_limit": median("ours_2w") / 2 / median("decode_limit"),
                         "ours_1w / imagefolder_1w": median("ours_1w") / median("imagefolder_1w"),
                         "ours_2w / imagefolder_2w": median("ours_2w") / median("imagefolder_2w")}}
    print(f"\n## {name}: {n} images, {manifest.image['field']}, {manifest.image['channels']} channel(s), "
          f"{manifest.image['size']}, {result['mean_bytes']} bytes on average; {rounds} rounds of "
          f"{k}-batch windows; {bundle[1]} / {bundle[2]} batches a DataLoader item with 1 / 2 workers")
    for key, value in {**result["rates"], **import_rate}.items():
        print(f"  {key:<36} {value:>9} img/s")
    for key, value in result["ratios"].items():
        print(f"  {key:<36} {value:>9.2f}")
    for key, value in startup.items():
        print(f"  {key + ' first batch':<36} {value:>9.1f} ms")
    return result


def batch_memory(repeats: int = 30) -> dict:
    """Why batch buffers are reused: one 256 x 3 x 64 x 64 uint8 batch stacked into fresh private
    memory, fresh shared memory (what a DataLoader worker does per batch) and reused shared memory."""
    images = [torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8) for _ in range(256)]
    reused = torch.empty(256 * 3 * 64 * 64, dtype=torch.uint8).share_memory_().view(256, 3, 64, 64)

    def fresh_shared():
        out = torch.empty(256 * 3 * 64 * 64, dtype=torch.uint8).share_memory_().view(256, 3, 64, 64)
        torch.stack(images, out=out)

    cases = {"fresh_private": lambda: torch.stack(images), "fresh_shared": fresh_shared,
             "reused_shared": lambda: torch.stack(images, out=reused)}
    times = {k: [] for k in cases}
    for _ in range(repeats):
        for key, fn in cases.items():
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    result = {f"{k}_ms": round(statistics.median(v) * 1e3, 3) for k, v in times.items()}
    print("\n## one 3 MB batch (256 x 3 x 64 x 64 uint8) stacked into ...")
    for key, value in result.items():
        print(f"  {key:<28} {value:>9.3f} ms")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer images and rounds (a smoke run)")
    ap.add_argument("--only", choices=("28", "64", "256"), help="measure one image set")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rounds = 3 if args.quick else 15
    info = machine()
    print("machine:", json.dumps(info))
    results = []
    with tempfile.TemporaryDirectory(prefix="dpt-bench-") as tmp:
        work = Path(tmp)
        if args.only in (None, "28"):
            seconds = timed_import(["mnist", "--out", str(work / "mnist"), "--workers", "2"])
            mnist_files(work / "mnist" / "train", work / "mnist_files")
            results.append(measure("MNIST 28x28 PNG (embedded)", work / "mnist" / "train", work / "mnist_files", 1,
                                   rounds, {"import_mnist_2proc": round(12_000 / seconds)}))
        for size, n in ((64, 2_000 if args.quick else 10_000), (256, 1_536 if args.quick else 4_000)):
            if args.only not in (None, str(size)):
                continue
            src = work / f"jpg{size}"
            make_folder(src, n, size)
            rate = {"import_imagefolder_2proc": round(n / timed_import(
                ["imagefolder", str(src), "--out", str(work / f"s{size}"), "--format", "jpg", "--workers", "2"]))}
            if size == 256:
                rate["import_resize_to_64_2proc"] = round(n / timed_import(
                    ["imagefolder", str(src), "--out", str(work / "s256to64"), "--format", "jpg",
                     "--image-size", "64", "--workers", "2"]))
            results.append(measure(f"{size}x{size} JPEG (photo-like, synthetic)", work / f"s{size}" / "train",
                                   src, 3, rounds, rate))
    memory = batch_memory()
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "results": results, "batch_memory": memory}, indent=1))


if __name__ == "__main__":
    main()
