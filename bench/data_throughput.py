"""Data throughput, all in one run on the same images:

  (a) decode only: our decoder over the encoded bytes held in memory (the limit of any reader),
  (a') batch floor: the same bytes decoded into their places in a batch buffer, in order, as our
       loader fills a batch (what a loader with no work of its own besides decoding would reach),
  (b) our shard loader (dpt_scale.shards.loader.ShardLoader), 0 / 1 / 2 worker processes,
  (c) torchvision ImageFolder + DataLoader over the same images as files, 1 / 2 workers,
plus import throughput (`dpt-scale data import`) and, for context, PIL, torchvision's public
decode_image and (if installed) TorchCodec on the same bytes.

Goals: (b) >= 0.9 x (a) per worker, and (b) >= 2 x (c). Every process decodes on one thread, as
dataloader workers do. Figures are medians over repeated timings. (b) and (c) are timed as a long
training run sees them: from the 13th batch on, once the workers run and the batch buffers
exist; the time to the first batch (start-up) is reported apart.

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

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from torchvision import datasets, transforms  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine  # noqa: E402

from dpt_scale.cli import main as cli  # noqa: E402
from dpt_scale.shards.batchpool import STACK_BYTES  # noqa: E402
from dpt_scale.shards.decode import decode_image, decode_jpeg_into  # noqa: E402
from dpt_scale.shards.loader import ShardLoader  # noqa: E402
from dpt_scale.shards.manifest import Manifest  # noqa: E402
from dpt_scale.shards.tar import iter_samples  # noqa: E402

BATCH = 256
EPOCHS = 3  # per timing, read straight through
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


def count_images(batches) -> int:
    return sum(len(b[0] if isinstance(b, (list, tuple)) else b["image"]) for b in batches)


def steady(batches, count: int, startup: list) -> float:
    """Seconds for `count` batches after the first WARMUP; the first batch's wait goes to `startup`."""
    start = time.perf_counter()
    next(batches)
    startup.append(time.perf_counter() - start)
    for _ in islice(batches, WARMUP - 1):
        pass
    begin = time.perf_counter()
    count_images(islice(batches, count))
    seconds = time.perf_counter() - begin
    if hasattr(batches, "close"):
        batches.close()  # stops the workers, outside the timing
    return seconds


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(name: str, shards: Path, files: Path, channels: int, repeats: int, import_rate: dict) -> dict:
    manifest = Manifest.load(shards)
    field = manifest.image["field"]
    blobs = [s[field] for e in manifest.shards for s in iter_samples(shards / e.name, fields=frozenset({field}))]
    n = len(blobs)
    mode = "GRAY" if channels == 1 else "RGB"

    def pil():
        for b in blobs:
            with Image.open(io.BytesIO(b)) as img:
                np.asarray(img.convert("L" if channels == 1 else "RGB"))

    def tv_public():
        from torchvision.io import ImageReadMode, decode_image as tv_decode
        for b in blobs:
            tv_decode(torch.frombuffer(bytearray(b), dtype=torch.uint8), mode=ImageReadMode[mode])

    # (callable, images it handles): every configuration runs once per repeat, in turn, so that
    # the machine's drift hits all of them alike; ratios are medians of per-repeat ratios.
    def decode_limit():
        for b in blobs:  # each output dropped at once, as in the other decode loops
            decode_image(b, channels)

    def torchcodec_loop():
        from torchcodec.decoders import decode_image as tc_decode
        for b in blobs:
            tc_decode(b, mode=mode)

    # The most a loader written in Python can reach: every image decoded into its place in a batch
    # buffer as our loader does, from bytes already in memory and in order; no tar walk, shuffle,
    # labels, keys or hand-over to another process.
    batch = torch.empty(BATCH, channels, *manifest.image["size"], dtype=torch.uint8,
                        memory_format=torch.channels_last)
    hwc = batch.permute(0, 2, 3, 1).numpy()

    chunk = max(1, min(BATCH, STACK_BYTES // batch[0].nbytes))  # as the loader stacks

    def batch_floor():
        for at in range(0, n, BATCH):
            part = blobs[at:at + BATCH]
            if field in ("jpg", "jpeg"):
                for i, b in enumerate(part):
                    decode_jpeg_into(b, hwc[i])
            else:
                for c in range(0, len(part), chunk):
                    images = [decode_image(b, channels) for b in part[c:c + chunk]]
                    torch.stack(images, out=batch[c:c + len(images)])

    configs = {"decode_limit": (decode_limit, n), "batch_floor": (batch_floor, n),
               "pil_decode": (pil, n), "torchvision_public_decode": (tv_public, n),
               "tar_parse_only": (lambda: sum(1 for e in manifest.shards for _ in iter_samples(shards / e.name)), n)}
    try:
        import torchcodec  # noqa: F401  (optional: measured when installed)
        configs["torchcodec_decode"] = (torchcodec_loop, n)
    except ImportError:
        pass
    startups = {}
    for workers in (0, 1, 2):  # EPOCHS epochs straight through, as training reads them
        loader = ShardLoader(shards, BATCH, workers=workers, streams=24, world_size=1, rank=0)
        count = EPOCHS * len(loader) - WARMUP
        startups[f"ours_{workers}w"] = []
        configs[f"ours_{workers}w"] = (lambda ld=loader, c=count, s=startups[f"ours_{workers}w"]: steady(
            ld.batches(0), c, s), count * BATCH)
    folder = datasets.ImageFolder(files, transform=transforms.PILToTensor(),
                                  loader=gray_loader if channels == 1 else datasets.folder.pil_loader)
    for workers in (1, 2):
        def folder_epochs(workers=workers):
            dl = DataLoader(folder, batch_size=BATCH, shuffle=True, num_workers=workers, drop_last=True,
                            persistent_workers=True)
            epochs = (batch for _ in range(EPOCHS) for batch in dl)
            return steady(epochs, EPOCHS * (n // BATCH) - WARMUP, startups[f"imagefolder_{workers}w"])
        startups[f"imagefolder_{workers}w"] = []
        configs[f"imagefolder_{workers}w"] = (folder_epochs, (EPOCHS * (n // BATCH) - WARMUP) * BATCH)
    runs = {key: [] for key in configs}
    for _ in range(repeats):
        for key, (fn, items) in configs.items():
            runs[key].append(items / (fn() if key in startups else timed(fn)))
    ratio = lambda a, b, k=1: statistics.median(x / k / y for x, y in zip(runs[a], runs[b]))  # noqa: E731
    result = {"name": name, "images": n, "image": manifest.image, "mean_bytes": int(np.mean([len(b) for b in blobs])),
              "rates": {k: round(statistics.median(v)) for k, v in runs.items()}, "import": import_rate,
              "startup_ms": {k: round(statistics.median(v) * 1e3, 1) for k, v in startups.items()},
              "ratios": {"batch_floor / decode_limit": ratio("batch_floor", "decode_limit"),
                         "ours_1w / batch_floor": ratio("ours_1w", "batch_floor"),
                         "ours_0w / decode_limit": ratio("ours_0w", "decode_limit"),
                         "ours_1w / decode_limit": ratio("ours_1w", "decode_limit"),
                         "ours_2w / 2 / decode_limit": ratio("ours_2w", "decode_limit", 2),
                         "ours_1w / imagefolder_1w": ratio("ours_1w", "imagefolder_1w"),
                         "ours_2w / imagefolder_2w": ratio("ours_2w", "imagefolder_2w")}}
    print(f"\n## {name}: {n} images, {manifest.image['field']}, {manifest.image['channels']} channel(s), "
          f"{manifest.image['size']}, {result['mean_bytes']} bytes on average")
    for key, value in {**result["rates"], **import_rate}.items():
        print(f"  {key:<28} {value:>9} img/s")
    for key, value in result["ratios"].items():
        print(f"  {key:<28} {value:>9.2f}")
    for key, value in result["startup_ms"].items():
        print(f"  {key + ' first batch':<28} {value:>9.1f} ms")
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
    ap.add_argument("--quick", action="store_true", help="fewer images and repeats (a smoke run)")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    repeats = 2 if args.quick else 5
    info = machine()
    print("machine:", json.dumps(info))
    results = []
    with tempfile.TemporaryDirectory(prefix="dpt-bench-") as tmp:
        work = Path(tmp)
        seconds = timed_import(["mnist", "--out", str(work / "mnist"), "--workers", "2"])
        mnist_files(work / "mnist" / "train", work / "mnist_files")
        results.append(measure("MNIST 28x28 PNG (embedded)", work / "mnist" / "train", work / "mnist_files", 1,
                               repeats, {"import_mnist_2proc": round(12_000 / seconds)}))
        for size, n in ((64, 2_000 if args.quick else 10_000), (256, 1_536 if args.quick else 4_000)):
            src = work / f"jpg{size}"
            make_folder(src, n, size)
            rate = {"import_imagefolder_2proc": round(n / timed_import(
                ["imagefolder", str(src), "--out", str(work / f"s{size}"), "--format", "jpg", "--workers", "2"]))}
            if size == 256:
                rate["import_resize_to_64_2proc"] = round(n / timed_import(
                    ["imagefolder", str(src), "--out", str(work / "s256to64"), "--format", "jpg",
                     "--image-size", "64", "--workers", "2"]))
            results.append(measure(f"{size}x{size} JPEG (photo-like, synthetic)", work / f"s{size}" / "train",
                                   src, 3, repeats, rate))
    memory = batch_memory()
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "results": results, "batch_memory": memory}, indent=1))


if __name__ == "__main__":
    main()
