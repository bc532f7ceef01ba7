"""Every GPU figure the project has not yet measured, in one run: U-ViT training, the stage-3 sampler, pseudo-labelling.

On a machine with one CUDA GPU (H100 or H200), from the repository root:

    pip install -e ".[gpu]"       # the project and xformers (pyproject's `gpu` extra; needs the package
                                  # index or a local wheel); without xformers its rows read
                                  # "not installed" and the rest still runs
    python bench/gpu_suite.py --json gpu_suite.json 2>&1 | tee gpu_suite.md

Each section alone: `--only train`, `--only sample` or `--only pseudo-label` (repeatable). A CPU
check of every code path, tiny models and one repeat (its figures are not benchmarks):

    OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu HF_HUB_OFFLINE=1 python bench/gpu_suite.py --smoke

Nothing is downloaded: every model has random weights (speed does not depend on them).

train (bench/uvit_step.py `train_bench`): U-ViT-L/2 and H/2 on 4x32x32 latents, 1000 classes (the
    ImageNet-256 recipes: L/2 with the 3x3 conv, H/2 without), bf16 weights and activations, batch
    128, forward + backward (no optimizer step). Per size one model; attention xformers and SDPA,
    each with and without gradient checkpointing, switched on that model and run once per repeat in
    turn: 3 warm-up steps per configuration, then the median of 10 repeats. Images/s, peak GPU memory
    (torch.cuda.max_memory_allocated) and MFU = 3 x forward FLOPs x images/s / dense bf16 peak (989
    TFLOP/s for H100/H200; a recomputed forward pass is not counted, as in the trainer). Ratios
    (SDPA / xformers, checkpointing / none) are medians of per-repeat ratios.
sample (bench/sampler.py `model_loop`): the project's solver loop as `dpt-scale sample` runs it,
    without shard writing: U-ViT-H/2 (1000 classes, `sd_discrete` schedule, attention `auto` as the
    recipes), DPM-Solver++ 50 steps, classifier-free guidance w = 1.4 (two forward passes per step),
    starting noise drawn beforehand, then uint8 on the CPU. Two configurations in turn per repeat:
    fp32 weights (`dpt-scale sample`'s default), batch 32, and bf16 weights, batch 256 (the
    recipes' sample.batch); one short warm-up each, median of 3 repeats. If a local autoencoder is
    found (--autoencoder, default assets/stable-diffusion/vae as in the ImageNet recipes) the latents
    are also decoded to 256x256 pixels through it (fp32, 32 at a time, as the sample stage does) and
    images/s is given with and without the decode; otherwise the figures are model-only, and say so.
pseudo-label (bench/pseudo_label.py `throughput`): a ViT-B/16 (timm vit_base_patch16_224, random
    weights, 1000 classes), bf16, over a synthetic shard set of 24,576 photo-like 256x256 JPEGs
    (bench/data_throughput.py `photo_like`; 512 distinct images repeated, 1,024 per shard), centre
    crop 0.875 -> 224 inside the model as the ImageNet recipe does, batch 256, 6 decoding workers
    (the recipe's classifier.pseudo_label.workers): (a) the pseudo-label path (`map_shards`) and (b)
    the model alone on the same images decoded beforehand, alternating, one warm-up, median of 3.

Budget on one H100 (the device tool allows 10 minutes per command): the FLOP counts are 0.46 / 0.80
TFLOP per training image (L/2 / H/2), 26.6 TFLOP per sampled H/2 image (50 steps x 2 passes) and
0.035 TFLOP per ViT-B image. At 40% of the bf16 peak and ~45 TFLOP/s in fp32 that is about 30-40 s
for train, 110 s for sample (bf16 3 x 16 s, fp32 3 x 19 s), 40 s for pseudo-label (with building
and decoding the shards) and ~20 s of start-up: about 3.5 minutes in all, and under 7 at half those
rates. Each section prints its wall time; the JSON is rewritten after every section, so a run cut
short still leaves what it finished.
"""
from __future__ import annotations

import argparse
import copy
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count()))

import numpy as np  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_throughput import photo_like  # noqa: E402
from machine import machine  # noqa: E402
from pseudo_label import throughput as pseudo_label_throughput  # noqa: E402
from sampler import model_loop  # noqa: E402
from uvit_step import train_bench  # noqa: E402

from dpt_scale.diffusion.schedules import build_schedule  # noqa: E402
from dpt_scale.engine.trainer import PEAK_FLOPS  # noqa: E402
from dpt_scale.models import build_uvit  # noqa: E402
from dpt_scale.models.attention import Attention  # noqa: E402
from dpt_scale.shards.writer import ShardSetWriter  # noqa: E402
from dpt_scale.stages.sample import _decoder  # noqa: E402  (the sample stage's own latent decode)

SECTIONS = ("train", "sample", "pseudo-label")
DEFAULT_AUTOENCODER = Path("assets/stable-diffusion/vae")  # where the ImageNet recipes look

# What each mode runs. GPU: the settings above, sized for < 9 minutes on one H100.
# Smoke: the same code paths with tiny models on the CPU, one repeat.
GPU = dict(
    train=dict(sizes=("L", "H"), conv={"L": True, "H": False}, batch=128, warmup=3, repeats=10, dtype=torch.bfloat16),
    sample=dict(size="H", conv=False, schedule="sd_discrete", classes=1000, latent=(4, 32, 32), steps=50,
                guidance=1.4, configs=(("fp32", torch.float32, 32), ("bf16", torch.bfloat16, 256)), warmup_steps=2,
                repeats=3, decode_batch=32),
    pseudo=dict(model="vit_base_patch16_224", size=256, crop_pct=0.875, images=24_576, distinct=512,
                shard_samples=1024, classes=1000, batch=256, workers=6, repeats=3, dtype=torch.bfloat16),
)
SMOKE = dict(
    train=dict(sizes=("tiny",), conv={"tiny": True}, batch=2, warmup=1, repeats=1, dtype=torch.bfloat16),
    sample=dict(size="tiny", conv=False, schedule="sd_discrete", classes=1000, latent=(4, 32, 32), steps=50,
                guidance=1.4, configs=(("fp32", torch.float32, 2), ("bf16", torch.bfloat16, 2)), warmup_steps=2,
                repeats=1, decode_batch=1),
    pseudo=dict(model="test_vit", size=64, crop_pct=0.5, images=48, distinct=8, shard_samples=16, classes=10,
                batch=8, workers=1, repeats=1, dtype=torch.bfloat16),
)


# ----------------------------------------------------------------------------------------------- train

def run_train(cfg: dict, device: torch.device) -> dict:
    rows = train_bench(cfg["sizes"], ("xformers", "sdpa"), (False, True), cfg["batch"], cfg["repeats"],
                       cfg["warmup"], device, cfg["dtype"], conv=cfg["conv"], num_classes=1000, log=lambda _: None)
    ratios = []
    for size in cfg["sizes"]:
        by = {(r["attention"], r["grad_checkpointing"]): r for r in rows if r["size"] == f"{size}/2"}

        def ratio(a, b, what="images/s"):  # images/s of a over b, per repeat (runs are seconds per step)
            if by[a]["status"] != "ok" or by[b]["status"] != "ok":
                return None
            if what == "memory":
                return round(by[a]["peak_memory_gb"] / by[b]["peak_memory_gb"], 3) if by[b]["peak_memory_gb"] else None
            return round(statistics.median(tb / ta for ta, tb in zip(by[a]["runs"], by[b]["runs"])), 3)

        for ckpt in (False, True):
            ratios.append({"size": f"{size}/2", "comparison": "SDPA / xformers, images/s", "grad_checkpointing": ckpt,
                           "value": ratio(("sdpa", ckpt), ("xformers", ckpt))})
        for backend in ("xformers", "sdpa"):
            ratios.append({"size": f"{size}/2", "comparison": "checkpointing / none, images/s", "attention": backend,
                           "value": ratio((backend, True), (backend, False))})
            ratios.append({"size": f"{size}/2", "comparison": "checkpointing / none, peak memory",
                           "attention": backend, "value": ratio((backend, True), (backend, False), "memory")})
    return {"settings": {"latent": [4, 32, 32], "patch": 2, "classes": 1000, "dtype": str(cfg["dtype"]),
                         "batch": cfg["batch"], "warmup_steps": cfg["warmup"], "repeats": cfg["repeats"],
                         "conv": cfg["conv"], "optimizer": None},
            "rows": rows, "ratios": ratios}


def train_tables(result: dict) -> str:
    s = result["settings"]
    out = [f"### Training: U-ViT on {'x'.join(map(str, s['latent']))} latents, {s['classes']} classes, {s['dtype']}, "
           f"batch {s['batch']}, forward + backward (median of {s['repeats']} repeats after {s['warmup_steps']} "
           "warm-up steps per configuration)", "",
           "| model | attention | grad ckpt | images/s | steps/s | peak memory (GB) | MFU |",
           "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for r in result["rows"]:
        head = f"| {r['size']} | {r['attention']} | {'yes' if r['grad_checkpointing'] else 'no'} |"
        if r["status"] != "ok":
            out.append(f"{head} {r['status']} | | | |")
        else:
            out.append(f"{head} {r['images_per_s']:,.1f} | {r['steps_per_s']:.3f} | {_fmt(r['peak_memory_gb'])} | "
                       f"{_pct(r['mfu'])} |")
    out += ["", "| model | ratio (median of per-repeat ratios) | setting | value |", "| --- | --- | --- | ---: |"]
    for r in result["ratios"]:
        setting = (f"grad ckpt {'yes' if r['grad_checkpointing'] else 'no'}" if "grad_checkpointing" in r
                   else r["attention"])
        out.append(f"| {r['size']} | {r['comparison']} | {setting} | {_fmt(r['value'], 'n/a')} |")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------- sample

def run_sample(cfg: dict, device: torch.device, autoencoder: Path | None, note: str | None = None) -> dict:
    """`note`: what the autoencoder is, or why there is none (reported with the figures)."""
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    with device:
        base = build_uvit(cfg["size"], img_size=cfg["latent"][1], patch_size=2, in_chans=cfg["latent"][0],
                          num_classes=cfg["classes"], conv=cfg["conv"], mlp_time_embed=False, qkv_bias=False,
                          attention="auto").eval()
    flops = base.flops_per_image()
    attention = next(m.backend for m in base.modules() if isinstance(m, Attention))  # what `auto` chose here
    models = {name: (base if dtype == torch.float32 else copy.deepcopy(base).to(dtype)) for name, dtype, _ in
              cfg["configs"]}
    schedule = build_schedule(cfg["schedule"])
    decode, decode_note = None, note or "none"
    if autoencoder is not None:
        decode = _decoder({"latent": {"autoencoder": str(autoencoder), "scale_factor": None}}, cfg["decode_batch"],
                          device)
        decode_note = f"{note or autoencoder} (fp32, {cfg['decode_batch']} images per decode)"
    gen = torch.Generator().manual_seed(0)
    most = max(b for _, _, b in cfg["configs"])
    labels = torch.randint(0, cfg["classes"], (most,), generator=gen)
    noise = torch.randn(most, *cfg["latent"], generator=gen)
    batches = {name: [(labels[:b], noise[:b])] for name, _, b in cfg["configs"]}

    def once(name: str, steps: int) -> dict:
        model = models[name]  # noqa: F821 (freed by `del` below, after its last call)
        return model_loop(model, schedule, batches[name], cfg["latent"], steps, cfg["guidance"],
                          cfg["classes"], device, decode)

    names = [name for name, _, _ in cfg["configs"]]
    for name in names:  # warm-up: kernels, allocator, the solver's first call, the decoder
        once(name, cfg["warmup_steps"])
    runs = {name: [] for name in names}
    memory = {name: 0 for name in names}
    for _ in range(cfg["repeats"]):
        for name in names:
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            runs[name].append(once(name, cfg["steps"]))
            if cuda:
                memory[name] = max(memory[name], torch.cuda.max_memory_allocated(device))
    rows, passes = [], 2 if cfg["guidance"] != 1.0 else 1  # guidance: a class and a null pass per step
    for name, _, batch in cfg["configs"]:
        model_s = [r["seconds"] - r["decode_seconds"] for r in runs[name]]
        row = {"model": f"{cfg['size']}/2", "weights": name, "attention": attention,
               "batch": batch, "steps": cfg["steps"], "guidance": cfg["guidance"],
               "images_per_s_model": round(batch / statistics.median(model_s), 2),
               "images_per_s_with_decode": (round(batch / statistics.median(r["seconds"] for r in runs[name]), 2)
                                            if decode else None),
               "model_tflop_per_s": round(passes * cfg["steps"] * flops * batch / statistics.median(model_s) / 1e12, 3),
               "peak_memory_gb": round(memory[name] / 1e9, 1) if cuda else None,
               "runs_seconds": [round(r["seconds"], 3) for r in runs[name]],
               "runs_decode_seconds": [round(r["decode_seconds"], 3) for r in runs[name]]}
        rows.append(row)
    ratios = {}
    if "bf16" in runs and "fp32" in runs:
        b16, b32 = (next(b for n, _, b in cfg["configs"] if n == k) for k in ("bf16", "fp32"))
        ratios["bf16 / fp32, images/s (model only)"] = round(statistics.median(
            (b16 / (x["seconds"] - x["decode_seconds"])) / (b32 / (y["seconds"] - y["decode_seconds"]))
            for x, y in zip(runs["bf16"], runs["fp32"])), 3)
    del models, base
    if cuda:
        torch.cuda.empty_cache()
    return {"settings": {"latent": list(cfg["latent"]), "classes": cfg["classes"], "schedule": cfg["schedule"],
                         "solver": "dpm_solver++", "steps": cfg["steps"], "guidance": cfg["guidance"],
                         "forward_passes_per_step": passes,
                         "gflop_per_forward_image": round(flops / 1e9, 1), "repeats": cfg["repeats"],
                         "warmup_steps": cfg["warmup_steps"], "decode": decode_note},
            "rows": rows, "ratios": ratios}


def sample_tables(result: dict) -> str:
    s = result["settings"]
    out = [f"### Sampler: DPM-Solver++ {s['steps']} steps, guidance w = {s['guidance']} "
           f"({s['forward_passes_per_step']} forward passes per step), {'x'.join(map(str, s['latent']))} latents, "
           f"{s['classes']} classes, random weights (median of {s['repeats']} repeats)", "",
           f"Decode: {s['decode']}." + (" Figures are the U-ViT alone (solver loop, then uint8 on the CPU)."
                                        if s["decode"].startswith("none") else ""), "",
           "| model | weights | attention | batch | images/s (model) | images/s (with decode) | TFLOP/s (model) "
           "| peak memory (GB) |",
           "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in result["rows"]:
        tflops = r["model_tflop_per_s"]
        out.append(f"| {r['model']} | {r['weights']} | {r['attention']} | {r['batch']} | "
                   f"{r['images_per_s_model']:,.2f} | {_fmt(r['images_per_s_with_decode'], 'not measured', ',.2f')} | "
                   f"{tflops:,.{1 if tflops >= 1 else 3}f} | "
                   f"{_fmt(r['peak_memory_gb'])} |")
    for k, v in result["ratios"].items():
        out += ["", f"{k}: {v} (median of per-repeat ratios)"]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------- pseudo-label

def write_shards(root: Path, cfg: dict) -> Path:
    """A shard set of photo-like JPEGs: `distinct` images, encoded once, repeated up to `images`."""
    from PIL import Image

    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(cfg["distinct"]):
        buf = io.BytesIO()
        Image.fromarray(photo_like(rng, cfg["size"])).save(buf, format="JPEG", quality=95)
        blobs.append(buf.getvalue())
    out = root / "train"
    with ShardSetWriter(out, classes=[str(c) for c in range(cfg["classes"])], image_field="jpg",
                        max_samples=cfg["shard_samples"], max_bytes=2**31) as writer:
        for i in range(cfg["images"]):
            writer.write({"__key__": f"i{i:07d}", "jpg": blobs[i % len(blobs)], "cls": i % cfg["classes"]},
                         (3, cfg["size"], cfg["size"]))
    return out


def run_pseudo(cfg: dict, device: torch.device) -> dict:
    with tempfile.TemporaryDirectory(prefix="gpu-suite-shards-") as tmp:
        start = time.perf_counter()
        shards = write_shards(Path(tmp), cfg)
        setup = time.perf_counter() - start
        result = pseudo_label_throughput(shards, cfg["model"], cfg["batch"], cfg["workers"], cfg["repeats"],
                                         None, device, cfg["dtype"], crop_pct=cfg["crop_pct"])
    runs = result["runs"]
    result["ratio_per_repeat_median"] = round(statistics.median(
        a / b for a, b in zip(runs["pipeline"], runs["model_only"])), 3)
    crop = round(cfg["size"] * cfg["crop_pct"])
    result["input"] = f"{cfg['size']} px JPEG, centre crop {cfg['crop_pct']} -> {crop} px"
    result["shards"] = {"images": cfg["images"], "distinct": cfg["distinct"], "per_shard": cfg["shard_samples"],
                        "seconds_to_write": round(setup, 1)}
    return result


def pseudo_tables(r: dict) -> str:
    return "\n".join([
        f"### Pseudo-labelling: {r['model']} (random weights), {r['dtype']}, {r['images']:,} images, "
        f"{r['input']} (median of {len(r['runs']['pipeline'])} repeats)", "",
        "| model | decode workers | batch | pipeline images/s | model-only images/s | pipeline / model-only |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        f"| {r['model']} | {r['workers']} | {r['batch']} | {r['images_per_s']['pipeline']:,.1f} | "
        f"{r['images_per_s']['model_only']:,.1f} | {r['ratio']} (per-repeat median {r['ratio_per_repeat_median']}) |"])


# ------------------------------------------------------------------------------------------------ main

def _fmt(value, missing: str = "-", spec: str = ",") -> str:
    return missing if value is None else format(value, spec)


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def environment(device: torch.device) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    def ver(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    env = {"torch_cuda": torch.version.cuda, "xformers": ver("xformers"), "timm": ver("timm"),
           "diffusers": ver("diffusers"), "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update({"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                    "cudnn": torch.backends.cudnn.version(),
                    "peak_bf16_flops_for_mfu": next((v for k, v in PEAK_FLOPS.items() if k in props.name), None)})
    return env


def tiny_autoencoder(root: Path) -> Path:
    """Smoke only: a small random diffusers AutoencoderKL (4 latent channels, 2x), saved locally."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                  layers_per_block=1, norm_num_groups=8, sample_size=64).save_pretrained(root / "vae")
    return root / "vae"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny models on the CPU, one repeat: checks the code paths")
    ap.add_argument("--only", action="append", choices=SECTIONS, help="run this section (repeatable); default all")
    ap.add_argument("--json", help="write the figures here (rewritten after every section)")
    ap.add_argument("--autoencoder", default=None,
                    help="local diffusers AutoencoderKL folder for the sampler's decode "
                         f"(default: {DEFAULT_AUTOENCODER} if present; 'none' to skip)")
    args = ap.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("gpu_suite.py: no CUDA GPU visible (torch.cuda.is_available() is False); run it on a GPU machine, "
              "or add --smoke for a CPU check of the code paths", file=sys.stderr)
        return 2
    if args.autoencoder not in (None, "none") and not (Path(args.autoencoder) / "config.json").is_file():
        print(f"gpu_suite.py: --autoencoder {args.autoencoder} is not a local diffusers AutoencoderKL folder "
              "(config.json + weights); nothing is downloaded", file=sys.stderr)
        return 2
    cfg = SMOKE if args.smoke else GPU
    device = torch.device("cpu" if args.smoke else "cuda")
    sections = [s for s in SECTIONS if s in (args.only or SECTIONS)]
    info = machine()
    report = {"mode": "smoke (CPU, tiny models: not benchmarks)" if args.smoke else "gpu", "machine": info,
              "environment": environment(device), "sections": {}, "seconds": {}}
    smoke_note = " -- SMOKE RUN: tiny models on the CPU, the figures are not benchmarks" if args.smoke else ""
    print(f"## GPU suite{smoke_note}")
    print("\nmachine: " + json.dumps(info) + "\nenvironment: " + json.dumps(report["environment"]), flush=True)

    with tempfile.TemporaryDirectory(prefix="gpu-suite-") as tmp:
        autoencoder = None
        note = f"none: no local autoencoder ({DEFAULT_AUTOENCODER} not found; --autoencoder DIR)"
        if args.autoencoder == "none":
            note = "none: skipped (--autoencoder none)"
        elif args.autoencoder is not None:
            autoencoder, note = Path(args.autoencoder), args.autoencoder
        elif args.smoke:  # random and tiny: proves the decode path only
            autoencoder, note = tiny_autoencoder(Path(tmp)), "a tiny random AutoencoderKL made for the smoke run"
        elif (DEFAULT_AUTOENCODER / "config.json").is_file():
            autoencoder, note = DEFAULT_AUTOENCODER, str(DEFAULT_AUTOENCODER)
        runners = {"train": (lambda: run_train(cfg["train"], device), train_tables),
                   "sample": (lambda: run_sample(cfg["sample"], device, autoencoder, note), sample_tables),
                   "pseudo-label": (lambda: run_pseudo(cfg["pseudo"], device), pseudo_tables)}
        for section in sections:
            run, table = runners[section]
            start = time.perf_counter()
            result = run()
            report["sections"][section] = result
            report["seconds"][section] = round(time.perf_counter() - start, 1)
            print(f"\n{table(result)}\n\n({section}: {report['seconds'][section]} s wall)", flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    print(f"\ntotal: {sum(report['seconds'].values()):.1f} s wall for {', '.join(sections)}")
    train_rows = report["sections"].get("train", {}).get("rows", [])
    broken = [f"{r['size']} {r['attention']} ckpt={r['grad_checkpointing']}: {r['status']}" for r in train_rows
              if r["status"].startswith(("failed", "out of memory"))]
    if broken:
        print("configurations that did not run: " + "; ".join(broken), file=sys.stderr)
        return 1 if args.smoke else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
