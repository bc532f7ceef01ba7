"""`dpt-scale shards ls|stat|verify|show|export DIR`: look at a shard set, or export it for other
tools. These take a directory, not a recipe. Also runnable as `python tools/shards.py ...`."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from dpt_scale.cli.registry import command, count
from dpt_scale.errors import UserError


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _dir_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", metavar="DIR", help="a shard set (a directory with manifest.json)")


@command("shards ls", "list the shards of a set with their sample counts and sizes", _dir_argument)
def shards_ls(args: argparse.Namespace) -> None:
    from dpt_scale.shards.manifest import Manifest

    manifest = Manifest.load(args.dir)
    width = max((len(s.name) for s in manifest.shards), default=5)
    print(f"{'shard':<{width}}  {'samples':>8}  {'size':>11}  sha256")
    for s in manifest.shards:
        print(f"{s.name:<{width}}  {s.samples:>8}  {_mib(s.bytes):>11}  {s.sha256[:16]}")
    print(f"{len(manifest.shards)} shards, {manifest.num_samples} samples, {_mib(manifest.num_bytes)}")


def _stat_arguments(p: argparse.ArgumentParser) -> None:
    _dir_argument(p)
    p.add_argument("--json", action="store_true", help="print the figures as JSON")


@command("shards stat", "totals, class histogram and image sizes of a shard set", _stat_arguments)
def shards_stat(args: argparse.Namespace) -> None:
    from dpt_scale.shards.manifest import Manifest

    m = Manifest.load(args.dir)
    if args.json:
        print(json.dumps({"samples": m.num_samples, "shards": len(m.shards), "bytes": m.num_bytes,
                          "classes": dict(zip(m.classes, m.class_histogram)), "unlabelled": m.unlabelled,
                          "image": m.image, "meta": m.meta}, indent=1))
        return
    print(f"{args.dir}: {m.num_samples} samples in {len(m.shards)} shards, {_mib(m.num_bytes)}"
          f" ({_mib(m.num_bytes // max(len(m.shards), 1))} per shard on average)")
    if m.image:
        size = "x".join(map(str, m.image["size"])) if m.image["size"] else \
            f"{'x'.join(map(str, m.image['min_size']))} to {'x'.join(map(str, m.image['max_size']))}"
        print(f"images: {m.image['field']}, {m.image['channels']} channel(s), {size}")
    for key in ("source", "split", "created", "unreadable"):
        if key in m.meta:
            print(f"{key}: {m.meta[key]}")
    top = max(m.class_histogram, default=0)
    print(f"{m.num_classes} classes" + (f", {m.unlabelled} unlabelled samples" if m.unlabelled else ""))
    for name, n in zip(m.classes, m.class_histogram):
        bar = "#" * round(30 * n / top) if top else ""
        print(f"  {name[:20]:<20} {n:>8}  {bar}")


def _verify_arguments(p: argparse.ArgumentParser) -> None:
    _dir_argument(p)
    p.add_argument("--workers", type=count(1, 256), default=2, metavar="N", help="shards checked in parallel")


@command("shards verify", "re-read every shard: checksums, tar structure, every image; exit 1 on any fault",
         _verify_arguments)
def shards_verify(args: argparse.Namespace) -> int:
    from dpt_scale.shards.verify import verify

    manifest, reports, faults = verify(args.dir, workers=args.workers)
    faults = [f for r in reports for f in r.faults] + faults
    bad = sorted({f.shard for f in faults})
    for fault in faults:
        print(f"FAULT {fault}")
    if faults:
        print(f"{args.dir}: {len(faults)} fault(s) in {len(bad)} file(s): {', '.join(bad[:10])}"
              + (" ..." if len(bad) > 10 else ""))
        return 1
    print(f"{args.dir}: OK, {len(manifest.shards)} shards and {manifest.num_samples} samples verified")
    return 0


def _show_arguments(p: argparse.ArgumentParser) -> None:
    _dir_argument(p)
    p.add_argument("--out", metavar="FILE", help="PNG to write (default: DIR/../NAME-grid.png)")
    p.add_argument("-n", type=count(1, 4096), default=64, metavar="N", help="the first N samples")
    p.add_argument("--per-class", type=count(1, 256), metavar="K",
                   help="K samples of every class, one row per class")


@command("shards show", "write a PNG grid of samples to look at", _show_arguments)
def shards_show(args: argparse.Namespace) -> None:
    from dpt_scale.shards.grid import sample_grid

    directory = Path(args.dir)
    out = Path(args.out) if args.out else directory.parent / f"{directory.resolve().name}-grid.png"
    if out.suffix.lower() != ".png" or out.is_dir():
        raise UserError(f"--out {out}: give the name of a .png file to write")
    print(sample_grid(directory, out, n=args.n, per_class=args.per_class))


def _export_arguments(p: argparse.ArgumentParser) -> None:
    _dir_argument(p)
    p.add_argument("--to", required=True, metavar="FORMAT",
                   help="npz: one .npz for guided-diffusion's evaluator (arr_0 uint8 NHWC RGB, grayscale repeated "
                        "to 3 channels; arr_1 int64 labels, -1 for none); imagefolder: PNG files in a folder per "
                        "class")
    p.add_argument("out", metavar="OUT", help="the .npz file, or the folder, to write (must not exist, or be empty)")
    p.add_argument("--flat", action="store_true",
                   help="imagefolder: every image in OUT itself, no class folders (pytorch-fid reads one folder); "
                        "needed for samples without a label")


@command("shards export", "write a shard set as an .npz sample batch or a PNG folder tree, for FID tools",
         _export_arguments)
def shards_export(args: argparse.Namespace) -> None:
    from dpt_scale.shards.export import export

    summary = export(args.dir, args.to, args.out, flat=args.flat)
    print(summary["out"])
