"""Scale: the sampler's I/O path at a million images, `shards verify` over them, an image-folder
import of 200k files, and what ImageNet would cost, projected from the measured figures.

    python bench/scale.py [--images 1000000] [--files 200000] [--work DIR] [--json FILE]

1. `dpt-scale sample` writes --images images (a `tiny` U-ViT on 8x8 grayscale, one solver step, no
   guidance: the model is cheap so that encoding, tar writing and bookkeeping are what is measured),
   1,000 per shard, in a fresh process: images/s, peak RSS, manifest size; the same for 10,000 images
   as the baseline of the RSS ratio.
2. `dpt-scale shards verify` on the result: every shard re-read, checksummed, every image decoded.
3. --files photo-like 64 px JPEG files in 100 class folders, then `dpt-scale data import imagefolder`
   with 2 workers, keeping the JPEG bytes (`--format jpg`) and re-encoding to PNG (the default):
   images/s (the files are made first and not timed).
4. The ImageNet projection: the measured per-core rates above, the reference U-ViT-H/2 throughput
   (one A100, DESIGN.md) and FLOP counts of our models; every assumption is printed with it.
Needs ~3 GB of disk in --work and about 15 minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count()))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_throughput import photo_like  # noqa: E402
from machine import machine  # noqa: E402
from sampler import workspace  # noqa: E402

PROBE = ("import resource, sys, time; from dpt_scale.cli import main; start = time.time(); code = main(sys.argv[1:]); "
         "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.time() - start); sys.exit(code)")


def measured(*args: str) -> dict:
    """`dpt-scale ARGS` in a fresh process: its wall seconds and peak RSS."""
    result = subprocess.run([sys.executable, "-c", PROBE, "-q", *args], capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"dpt-scale {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    _, kib, seconds = next(line for line in result.stdout.splitlines() if line.startswith("PEAK")).split()
    return {"seconds": round(float(seconds), 1), "peak_rss_mib": round(int(kib) / 1024, 1)}


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def generate(work: Path, images: int) -> dict:
    recipe = workspace(work / "sampler", 8, 1, "tiny", 2, {"batch": 256, "steps": 1, "guidance": 1.0,
                                                          "shard_samples": 1000})
    samples = work / "sampler" / "run" / "samples"
    out = {}
    for n in (10_000, images):
        shutil.rmtree(samples, ignore_errors=True)
        run = measured("sample", str(recipe), "--set", f"sample.total={n}")
        out[n] = {**run, "images_per_s": round(n / run["seconds"]),
                  "shards": len(list(samples.glob("*.tar"))), "gib": round(folder_size(samples) / 2**30, 2),
                  "manifest_kib": round((samples / "manifest.json").stat().st_size / 1024, 1)}
        print(f"sample {n:,}: {out[n]}", flush=True)
    verify = measured("shards", "verify", str(samples))
    verify["images_per_s"] = round(images / verify["seconds"])
    print(f"verify {images:,}: {verify}", flush=True)
    return {"sample": out, "rss_ratio": round(out[images]["peak_rss_mib"] / out[10_000]["peak_rss_mib"], 3),
            "verify": verify}


def _write_files(args: tuple[Path, int, int]) -> None:
    root, start, stop = args
    rng = np.random.default_rng(start)
    for i in range(start, stop):
        directory = root / f"class{i % 100:03d}"
        directory.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo_like(rng, 64)).save(directory / f"img{i:07d}.jpg", quality=90)


def import_folder(work: Path, files: int) -> dict:
    root = work / "folder"
    chunks = [(root, i, min(i + 5000, files)) for i in range(0, files, 5000)]
    start = time.perf_counter()
    with multiprocessing.Pool(os.cpu_count()) as pool:
        pool.map(_write_files, chunks)
    made = time.perf_counter() - start
    result = {"files": files, "file_mib": round(folder_size(root) / 2**20), "made_in_s": round(made, 1)}
    for fmt in ("jpg", "png"):  # jpg: the files' bytes kept (each still decoded once to check it); png: re-encoded
        run = measured("data", "import", "imagefolder", str(root), "--out", str(work / f"imported-{fmt}"),
                       "--format", fmt, "--workers", "2")
        result[fmt] = {**run, "images_per_s": round(files / run["seconds"])}
        shutil.rmtree(work / f"imported-{fmt}")
        print(f"import {files:,} files as {fmt}: {result[fmt]}", flush=True)
    return result


# The reference's U-ViT-H/2 training speed, one A100 80 GB, batch 128, fp16 + xformers (DESIGN.md).
A100_H2_IMAGES_PER_S = 1.14 * 128
H100_BF16_PEAK, ASSUMED_MFU = 989e12, 0.40  # for the models the reference gives no speed for
IMAGENET, CLASSES, K = 1_281_167, 1000, 128
IMPORT_PER_CORE = 2680 / 2  # 256 px JPEG -> 64 px, re-encoded, 2 workers (docs/benchmarks.md, import)
ORIGINAL_PIXELS = 400 * 350 / 256**2  # ImageNet's originals average about 400x350: ~2.1x the decode work
GPUS = (8, 32, 64)


def vit_flops(depth: int, dim: int, tokens: int) -> float:
    """Forward FLOPs of a ViT (a multiply-add counts 2): attention projections, scores, MLP x4."""
    return depth * (2 * tokens * 12 * dim * dim + 4 * tokens * tokens * dim)


def projection(scale: dict) -> list[tuple[str, float, str, str]]:
    """ImageNet-256 DPT from our measured rates, the reference's GPU figure and FLOP counts:
    (what, GPU-hours or None, CPU figure, basis)."""
    import torch

    from dpt_scale.models import build_uvit

    with torch.device("meta"):
        uvit = {size: build_uvit(size=size, img_size=32, patch_size=2, in_chans=4, num_classes=CLASSES,
                                 conv=size == "L").flops_per_image() for size in ("L", "H")}
    a100_flops = A100_H2_IMAGES_PER_S * 3 * uvit["H"]  # the FLOP rate the reference's speed implies
    probe = vit_flops(24, 1024, (224 // 7) ** 2 + 1)  # MSN ViT-L/7 features at 224
    h100 = H100_BF16_PEAK * ASSUMED_MFU
    samples = scale["sample"][max(scale["sample"])]
    per_image_kib = samples["manifest_kib"] / max(scale["sample"]) * 1000  # per 1,000-image shard
    return [
        ("import 1.28M JPEGs to 256 px shards", None,
         f"{IMAGENET / (IMPORT_PER_CORE / ORIGINAL_PIXELS) / 3600:.1f} core-hours",
         f"{IMPORT_PER_CORE:,.0f} images/s per core measured at 256 px, scaled by the originals' ~2.1x pixels"),
        ("stage 1 features + pseudo-labels, MSN ViT-L/7 (1.28M)", IMAGENET * probe / h100 / 3600, "",
         f"{probe / 1e9:.0f} GFLOP per image, H100 bf16 at {ASSUMED_MFU:.0%} MFU (assumed)"),
        ("stage 2, U-ViT-L/2, 300k steps x 1024", 300_000 * 1024 * 3 * uvit["L"] / a100_flops / 3600, "",
         f"reference A100 speed for H/2 scaled by FLOPs ({uvit['L'] / 1e9:.0f} vs {uvit['H'] / 1e9:.0f} GFLOP)"),
        ("stage 2, U-ViT-H/2, 500k steps x 1024", 500_000 * 1024 / A100_H2_IMAGES_PER_S / 3600, "",
         f"reference: {A100_H2_IMAGES_PER_S:.0f} images/s per A100 (fp16, xformers)"),
        ("stage 3, H/2, K=128 x 1000 classes, 50 guided steps", CLASSES * K * 100 * uvit["H"] / a100_flops / 3600,
         f"{CLASSES * K / samples['images_per_s'] * 2 / 3600:.2f} core-hours of I/O path at 8x8",
         "100 forward passes per image at the reference's FLOP rate (A100); the KL-f8 decode comes on top"),
        ("stage 4 features of 1.28M + 128k images (linear probe)", (IMAGENET + CLASSES * K) * probe / h100 / 3600,
         "", "as stage 1"),
        ("`shards verify` of 1.28M + 128k images", None,
         f"{(IMAGENET + CLASSES * K) / 1700 / 3600:.2f} core-hours",
         f"decoding dominates at 256 px (~1,700 JPEG/s per core); {scale['verify']['images_per_s']:,} images/s "
         "on 2 cores at 8x8"),
        ("manifests", None, f"{per_image_kib * (IMAGENET + CLASSES * K) / 1000 / 1024:.1f} MiB",
         f"{per_image_kib:.2f} KiB per 1,000-image shard, measured"),
    ]


def _duration(hours: float) -> str:
    return f"{hours:,.1f} h" if hours >= 1 else f"{hours * 60:.0f} min"


def projection_table(rows) -> str:
    lines = ["| ImageNet-256 DPT | GPU-hours | " + " | ".join(f"{n} GPUs" for n in GPUS) + " | CPU | basis |",
             "| --- | ---: | " + " | ".join("---:" for _ in GPUS) + " | --- | --- |"]
    for what, hours, cpu, basis in rows:
        cells = [f"{hours:,.1f}" if hours else "—"] + [_duration(hours / n) if hours else "—" for n in GPUS]
        lines.append(f"| {what} | " + " | ".join(cells) + f" | {cpu or '—'} | {basis} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1_000_000)
    parser.add_argument("--files", type=int, default=200_000)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "dpt-scale-bench")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    scale = generate(args.work, args.images)
    shutil.rmtree(args.work / "sampler")
    folder = import_folder(args.work, args.files)
    shutil.rmtree(args.work)
    rows = projection(scale)
    print("\n" + projection_table(rows))
    record = {"machine": machine(), "scale": scale, "import": folder, "projection": rows}
    print(json.dumps(record, indent=1))
    if args.json:
        args.json.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
