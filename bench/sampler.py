"""The stage-3 sampler: its overhead over the model alone, and its memory as the run grows.

    python bench/sampler.py throughput [--images 2048 --steps 10 --size 28 --gpu]
    python bench/sampler.py memory [--small 10000 --large 200000]

throughput: in one run, alternating for --repeats rounds,
  (a) `dpt-scale sample` end to end, in-process (plan, solver, background PNG encoding, shard
      writing, progress records, manifest), and
  (b) the model alone: the same model, the same batches and solver steps, starting noise drawn
      beforehand, images converted to uint8 on the CPU and dropped.
  Goal: (a) / (b) >= 0.95. The model is a randomly initialised U-ViT of the recipe size given:
  its weights do not change the cost.
memory: peak RSS of `dpt-scale sample` (a fresh process each) generating --small and then --large
  images with a tiny model on 8x8 images and one solver step (the I/O path, not the model).
  Goal: large / small <= 1.1.
quality: a trained run's model (`--recipe`, its `out`) sampled with each `--configs` solver:steps,
  K per class, guidance from the recipe: FID, KID, precision/recall and conditional accuracy
  against the run's reference set (`dpt-scale evaluate`'s metrics), and seconds per image.

    python bench/sampler.py quality --recipe recipes/mnist-cpu.yaml --per-class 50 \
        --configs dpm_solver++:10 dpm_solver++:25 dpm_solver++:50 ddpm:250
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count()))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import yaml  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine  # noqa: E402

from dpt_scale.diffusion.sampling import sample as run_solver  # noqa: E402
from dpt_scale.diffusion.sampling import to_uint8  # noqa: E402
from dpt_scale.diffusion.schedules import build_schedule  # noqa: E402
from dpt_scale.generation.plan import GenerationPlan  # noqa: E402
from dpt_scale.models import build_uvit  # noqa: E402
from dpt_scale.recipe import load_recipe  # noqa: E402
from dpt_scale.shards.writer import ShardSetWriter  # noqa: E402

CLASSES = 10


def workspace(root: Path, size: int, channels: int, model: str, patch: int, sample: dict) -> Path:
    """A recipe whose `sample` stage finds everything it needs: a (tiny) training set for the
    model settings and an exported, randomly initialised U-ViT."""
    data = root / "data" / "train"
    with ShardSetWriter(data, classes=[str(c) for c in range(CLASSES)]) as writer:
        for c in range(CLASSES):
            writer.write({"__key__": f"k{c}", "png": _png(size, channels), "cls": c}, (channels, size, size))
    settings = dict(size=model, img_size=size, patch_size=patch, in_chans=channels, num_classes=CLASSES, conv=True,
                    mlp_time_embed=False, qkv_bias=False, attention="auto", grad_checkpointing=False)
    torch.manual_seed(0)
    state = build_uvit(**settings).state_dict()
    torch.save({"kind": "diffusion", "weights": state, "ema": {}, "settings": settings, "schedule": "linear_vp",
                "classes": [str(c) for c in range(CLASSES)], "labels": "ground_truth"}, root / "weights.pt")
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "bench-sampler", "out": str(root / "run"), "data": {"root": str(root / "data")},
        "diffusion": {"model": {"size": model, "patch_size": patch}, "labels": "ground_truth"},
        "sample": {"checkpoint": str(root / "weights.pt"), **sample}}))
    return recipe


def _png(size: int, channels: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L" if channels == 1 else "RGB", (size, size)).save(buf, format="PNG")
    return buf.getvalue()


def model_loop(model, schedule, batches, shape: tuple[int, ...], steps: int, guidance: float, null_class: int,
               device: torch.device, decode=None) -> dict:
    """The sampler without its I/O: for each (labels, noise) of `batches` (noise drawn beforehand, on the
    CPU), the project's solver loop (DPM-Solver++, guidance as `dpt-scale sample` applies it), then
    `decode` (latents -> pixels) if given, then uint8 on the CPU, dropped. Returns the wall seconds and,
    of those, the seconds spent decoding (timed between device synchronisations; 0 without decode)."""
    decoding = 0.0
    start = time.perf_counter()
    for labels, noise in batches:
        x = run_solver(model, schedule, labels.to(device), shape, steps, guidance, null_class=null_class,
                       noise=noise.to(device))
        if decode is not None:
            _sync(device)
            begin = time.perf_counter()
            x = decode(x)
            _sync(device)
            decoding += time.perf_counter() - begin
        to_uint8(x).cpu()
    return {"seconds": time.perf_counter() - start, "decode_seconds": decoding}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def throughput(args) -> dict:
    from dpt_scale.diffusion.export import load_diffusion
    from dpt_scale.stages.sample import sample

    device = torch.device("cuda" if args.gpu else "cpu")
    root = Path(tempfile.mkdtemp(prefix="bench-sampler-"))
    settings = {"total": args.images, "batch": args.batch, "steps": args.steps, "guidance": args.guidance,
                "shard_samples": args.shard_samples}
    recipe = load_recipe(workspace(root, args.size, args.channels, args.model, args.patch, settings))
    model, payload = load_diffusion(recipe, root / "weights.pt", device)
    schedule = build_schedule(payload["schedule"])
    plan = GenerationPlan(args.images, CLASSES, recipe.seed, args.shard_samples, args.batch, (1.0,) * CLASSES)
    shape = (args.channels, args.size, args.size)
    batches = [plan.draw(b, shape)[:2] for s in range(plan.shards) for b in plan.batches(s)]

    def end_to_end() -> float:
        shutil.rmtree(root / "run", ignore_errors=True)
        start = time.perf_counter()
        sample(recipe)
        return args.images / (time.perf_counter() - start)

    def model_only() -> float:
        return args.images / model_loop(model, schedule, batches, shape, args.steps, args.guidance, CLASSES,
                                        device)["seconds"]

    model_only()  # warm-up (allocator, kernels, imports)
    runs = {"end_to_end": [], "model_only": []}
    for _ in range(args.repeats):
        runs["end_to_end"].append(end_to_end())
        runs["model_only"].append(model_only())
    shutil.rmtree(root)
    ratios = [a / b for a, b in zip(runs["end_to_end"], runs["model_only"])]
    return {"images": args.images, "batch": args.batch, "steps": args.steps, "guidance": args.guidance,
            "model": args.model, "patch": args.patch, "image": list(shape), "device": str(device),
            "images_per_s": {k: round(statistics.median(v), 1) for k, v in runs.items()},
            "ratio": round(statistics.median(ratios), 3),
            "runs": {k: [round(x, 1) for x in v] for k, v in runs.items()}}


def memory(args) -> dict:
    root = Path(tempfile.mkdtemp(prefix="bench-sampler-mem-"))
    recipe = workspace(root, 8, 1, "tiny", 2, {"batch": 256, "steps": 1, "guidance": 1.0, "shard_samples": 1000})
    probe = ("import resource, sys, time; from dpt_scale.cli import main; start = time.time(); "
             "code = main(sys.argv[1:]); "
             "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.time() - start); sys.exit(code)")
    out = {}
    for n in (args.small, args.large):
        shutil.rmtree(root / "run", ignore_errors=True)
        command = [sys.executable, "-c", probe, "-q", "sample", str(recipe), "--set", f"sample.total={n}"]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode:
            raise SystemExit(result.stderr[-3000:])
        _, kib, seconds = next(l for l in result.stdout.splitlines() if l.startswith("PEAK")).split()
        out[n] = {"peak_rss_mib": round(int(kib) / 1024, 1), "seconds": round(float(seconds), 1),
                  "images_per_s": round(n / float(seconds)),
                  "manifest_kib": round((root / "run" / "samples" / "manifest.json").stat().st_size / 1024, 1)}
    shutil.rmtree(root)
    return {"images": out, "ratio": round(out[args.large]["peak_rss_mib"] / out[args.small]["peak_rss_mib"], 3)}


def quality(args) -> dict:
    from dpt_scale.metrics.generation import generation_metrics
    from dpt_scale.stages.sample import sample

    base = load_recipe(args.recipe, args.set)
    root = Path(tempfile.mkdtemp(prefix="bench-quality-"))
    rows = {}
    for config in args.configs:
        solver, steps = config.split(":")
        recipe = load_recipe(args.recipe, [*args.set, f"out={root / config.replace(':', '-')}",
                                           f"data.root={base.data_root}",
                                           f"sample.checkpoint={Path(base.out) / 'diffusion' / 'weights.pt'}",
                                           "evaluate.reference="
                                           f"{base.evaluate.reference or Path(base.data_root) / 'val'}",
                                           f"sample.solver={solver}", f"sample.steps={steps}",
                                           f"sample.per_class={args.per_class}"])
        start = time.perf_counter()
        sample(recipe)
        seconds = time.perf_counter() - start
        metrics = generation_metrics(recipe)
        rows[config] = {k: metrics[k] for k in ("fid", "kid_mean", "precision", "recall", "conditional_accuracy")}
        rows[config]["seconds_per_image"] = round(seconds / metrics["samples"], 4)
        print(config, json.dumps(rows[config]), flush=True)
    shutil.rmtree(root)
    return {"run": base.out, "per_class": args.per_class, "guidance": base.sample.guidance, "configs": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="bench", required=True)
    t = sub.add_parser("throughput")
    t.add_argument("--images", type=int, default=2048)
    t.add_argument("--batch", type=int, default=256)
    t.add_argument("--steps", type=int, default=10)
    t.add_argument("--guidance", type=float, default=1.4)
    t.add_argument("--size", type=int, default=28)
    t.add_argument("--channels", type=int, default=1)
    t.add_argument("--model", default="tiny")
    t.add_argument("--patch", type=int, default=4)
    t.add_argument("--shard-samples", type=int, default=1024)
    t.add_argument("--repeats", type=int, default=3)
    t.add_argument("--gpu", action="store_true")
    m = sub.add_parser("memory")
    m.add_argument("--small", type=int, default=10_000)
    m.add_argument("--large", type=int, default=200_000)
    q = sub.add_parser("quality")
    q.add_argument("--recipe", required=True)
    q.add_argument("--set", action="append", default=[], help="recipe override KEY=VALUE")
    q.add_argument("--per-class", type=int, default=50)
    q.add_argument("--configs", nargs="+",
                   default=["dpm_solver++:10", "dpm_solver++:25", "dpm_solver++:50", "ddpm:250"])
    args = p.parse_args()
    result = {"throughput": throughput, "memory": memory, "quality": quality}[args.bench](args)
    print(json.dumps({"machine": machine(), "bench": args.bench, **result}, indent=1))


if __name__ == "__main__":
    main()
