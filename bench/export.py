"""`dpt-scale shards export`: images/s and peak memory at two set sizes, so that bounded memory shows.

    python bench/export.py [--sizes 2000 20000] [--image-size 64] [--channels 3] [--repeats 3]

Writes a shard set of each size (random-pixel PNGs, 1,000 a shard), then runs `dpt-scale shards
export` on it with `--to npz` and `--to imagefolder`, --repeats times each, each in a fresh process
that reports its peak RSS, and RSS once its imports are done (torch and its libraries: most of it).
Images/s are the median run's: the first export into a fresh folder on this VM can run several
times slower. The whole npz array of the larger set would take sizes x H x W x 3 bytes (234 MiB for
20,000 64 px images); the export holds one 32 MiB chunk of it. Goal: the larger set's peak RSS
within 10% of the smaller's, for both formats.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine  # noqa: E402

from dpt_scale.shards.writer import ShardSetWriter  # noqa: E402

# In the fresh process: the imports first (torch and its libraries are most of the RSS), then the
# command, timed alone; peak RSS over the whole process, and RSS once imported for comparison.
PROBE = ("import resource, sys, time; import dpt_scale.shards.export; from dpt_scale.cli import build_parser, main; "
         "build_parser(); "
         "imported = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS')); "
         "start = time.perf_counter(); code = main(sys.argv[1:]); "
         "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, imported, time.perf_counter() - start); "
         "sys.exit(code)")


def shard_set(directory: Path, n: int, size: int, channels: int) -> Path:
    rng = np.random.default_rng(0)
    shape = (size, size) if channels == 1 else (size, size, 3)
    with ShardSetWriter(directory, classes=[f"c{c}" for c in range(10)], prefix="shard", max_samples=1000) as w:
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(buf, format="PNG", compress_level=1)
            w.write({"__key__": f"s{i:07d}", "png": buf.getvalue(), "cls": i % 10}, (channels, size, size))
    return directory


def run_export(directory: Path, to: str, out: Path) -> dict:
    command = [sys.executable, "-c", PROBE, "-q", "shards", "export", str(directory), "--to", to, str(out)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(result.stderr[-3000:])
    _, peak, imported, seconds = next(line for line in result.stdout.splitlines() if line.startswith("PEAK")).split()
    return {"seconds": float(seconds), "peak_rss_mib": round(int(peak) / 1024, 1),
            "imported_rss_mib": round(int(imported) / 1024, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs=2, default=[2000, 20000], metavar=("SMALL", "LARGE"))
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--channels", type=int, choices=[1, 3], default=3)
    ap.add_argument("--repeats", type=int, default=3, help="exports of each set and format (a fresh process each)")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    info = machine()
    root = Path(tempfile.mkdtemp(prefix="bench-export-"))
    results: dict = {}
    try:
        for n in args.sizes:
            shards = shard_set(root / f"set-{n}", n, args.image_size, args.channels)
            for to, target in (("npz", f"{n}.npz"), ("imagefolder", f"{n}-tree")):
                runs = []
                for _ in range(args.repeats):
                    runs.append(run_export(shards, to, root / target))
                    shutil.rmtree(root / target) if to == "imagefolder" else (root / target).unlink()
                rates = [n / r["seconds"] for r in runs]
                row = {"images_per_s": round(statistics.median(rates)), "runs_images_per_s": [round(r) for r in rates],
                       "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
                       "imported_rss_mib": max(r["imported_rss_mib"] for r in runs)}
                results.setdefault(to, {})[n] = row
                print(f"{to:<12} {n:>7} images: {row['images_per_s']:>6} images/s (median of {args.repeats}), "
                      f"peak RSS {row['peak_rss_mib']} MiB ({row['imported_rss_mib']} MiB once imported)", flush=True)
            shutil.rmtree(shards)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    small, large = args.sizes
    for to, rows in results.items():
        rows["rss_ratio"] = round(rows[large]["peak_rss_mib"] / rows[small]["peak_rss_mib"], 3)
    whole = large * args.image_size ** 2 * 3 / 2**20
    out = {"machine": info, "image": [args.channels, args.image_size, args.image_size],
           "whole_npz_array_mib": round(whole, 1), "results": results}
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
