"""U-ViT training step: forward + backward time per image, per attention backend, medians in one run.

    python bench/uvit_step.py                 # CPU: tiny and S, pixel 3x32x32 and latent 4x32x32
    python bench/uvit_step.py --gpu           # GPU: L/2 and H/2 on 4x32x32 latents, bf16, batch 128,
                                              # xformers and SDPA, with/without gradient checkpointing:
                                              # images/s, peak memory, MFU

Every configuration runs once per repeat, in turn; figures are medians over repeats.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count()))

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine  # noqa: E402

from dpt_scale.models import build_uvit  # noqa: E402
from dpt_scale.models.attention import xformers_available  # noqa: E402
from dpt_scale.engine.trainer import PEAK_FLOPS  # noqa: E402


def step_fn(model, batch: int, chans: int, device, dtype):
    x = torch.randn(batch, chans, 32, 32, device=device, dtype=dtype)
    t = torch.rand(batch, device=device) * 1000
    y = torch.randint(0, model.num_classes, (batch,), device=device)
    params = [p for p in model.parameters()]

    def step():
        for p in params:
            p.grad = None
        model(x, t, y).float().square().mean().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
    return step


def cpu_suite(repeats: int, batch: int) -> list[dict]:
    configs = {}
    for size in ("tiny", "S"):
        for space, chans in (("pixel 3x32x32", 3), ("latent 4x32x32", 4)):
            for backend in ("sdpa", "math"):
                torch.manual_seed(0)
                model = build_uvit(size, img_size=32, patch_size=2, in_chans=chans, num_classes=10,
                                   conv=space.startswith("pixel"), attention=backend).train()
                configs[(size, space, backend)] = (model, step_fn(model, batch, chans, torch.device("cpu"), torch.float32))
    times = {k: [] for k in configs}
    for key, (_, step) in configs.items():
        step()  # warm-up
    for _ in range(repeats):
        for key, (_, step) in configs.items():
            start = time.perf_counter()
            step()
            times[key].append((time.perf_counter() - start) / batch)
    rows = []
    for (size, space, backend), values in times.items():
        model = configs[(size, space, backend)][0]
        ms = statistics.median(values) * 1e3
        rows.append({"size": size, "input": space, "attention": backend, "ms_per_image": round(ms, 2),
                     "gflops_per_s": round(3 * model.flops_per_image() / (ms / 1e3) / 1e9, 1)})
        print(f"{size:>4} {space:<15} {backend:<5} {ms:9.2f} ms/image  {rows[-1]['gflops_per_s']:7.1f} GFLOP/s")
    return rows


def gpu_suite(repeats: int, batch: int) -> list[dict]:
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    backends = ["xformers", "sdpa"] if xformers_available() else ["sdpa"]
    rows = []
    for size in ("L", "H"):
        for backend in backends:
            for ckpt in (False, True):
                torch.manual_seed(0)
                model = build_uvit(size, img_size=32, patch_size=2, in_chans=4, num_classes=1000, conv=False,
                                   attention=backend, grad_checkpointing=ckpt).to(device, torch.bfloat16).train()
                step = step_fn(model, batch, 4, device, torch.bfloat16)
                for _ in range(3):
                    step()
                torch.cuda.reset_peak_memory_stats(device)
                values = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    step()
                    values.append(time.perf_counter() - start)
                seconds = statistics.median(values)
                images_per_s = batch / seconds
                row = {"size": f"{size}/2", "attention": backend, "grad_checkpointing": ckpt, "batch": batch,
                       "steps_per_s": round(1 / seconds, 3), "images_per_s": round(images_per_s, 1),
                       "peak_memory_gb": round(torch.cuda.max_memory_allocated(device) / 1e9, 1),
                       "mfu": round(3 * model.flops_per_image() * images_per_s / peak, 3) if peak else None}
                rows.append(row)
                print(json.dumps(row))
                del model, step
                torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=None, help="default: 8 on CPU, 128 on GPU")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    info = machine()
    print("machine:", json.dumps(info))
    if args.gpu:
        rows = gpu_suite(args.repeats, args.batch or 128)
    else:
        torch.set_num_threads(os.cpu_count())
        rows = cpu_suite(args.repeats, args.batch or 8)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
