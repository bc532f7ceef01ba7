"""U-ViT training step: forward + backward time per image, per attention backend, medians in one run.

    python bench/uvit_step.py                 # CPU: tiny and S, pixel 3x32x32 and latent 4x32x32
    python bench/uvit_step.py --gpu           # GPU: L/2 and H/2 on 4x32x32 latents, bf16, batch 128,
                                              # xformers and SDPA, with/without gradient checkpointing:
                                              # images/s, peak memory, MFU

Every configuration runs once per repeat, in turn; figures are medians over repeats.
"""
from __future__ import annotations

import argparse
import importlib.util
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

from dpt_scale.engine.trainer import PEAK_FLOPS  # noqa: E402
from dpt_scale.models import build_uvit  # noqa: E402
from dpt_scale.models.attention import Attention, resolve_backend, xformers_available  # noqa: E402


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
                step = step_fn(model, batch, chans, torch.device("cpu"), torch.float32)
                configs[(size, space, backend)] = (model, step)
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


def set_attention(model, backend: str) -> None:
    """Switch every attention layer of a U-ViT to `backend` (checked as at construction)."""
    backend = resolve_backend(backend)
    for module in model.modules():
        if isinstance(module, Attention):
            module.backend = backend


def backend_status(backend: str, device: torch.device) -> str:
    """'ok', or why this attention backend cannot run here (a table entry, not an exception)."""
    if backend != "xformers":
        return "ok"
    if importlib.util.find_spec("xformers") is None:
        return "not installed"
    return "ok" if device.type == "cuda" and xformers_available() else "needs CUDA"


def train_bench(sizes, backends, checkpointing=(False, True), batch: int = 128, repeats: int = 5, warmup: int = 3,
                device: torch.device | str = "cuda", dtype: torch.dtype = torch.bfloat16, conv=False,
                num_classes: int = 1000, log=print) -> list[dict]:
    """Training steps (forward + backward, no optimizer) of class-conditional U-ViTs on 4x32x32 latents,
    patch 2: one model per size in `dtype`, every (attention backend, gradient checkpointing)
    configuration switched on that same model, each running once per repeat in turn; medians over
    repeats. `conv`: a bool, or a dict size -> bool (the 3x3 conv after unpatchify). One row per
    configuration; one that cannot run has `status` saying why ('not installed', 'needs CUDA',
    'out of memory', 'failed: ...') and no figures. `runs` holds the per-repeat step seconds, so that
    ratios can be taken repeat by repeat."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else ""
    peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    rows = []
    for size in sizes:
        configs = [(b, c) for b in backends for c in checkpointing]
        status = {key: backend_status(key[0], device) for key in configs}
        runnable = [key for key in configs if status[key] == "ok"]
        model = step = None
        if runnable:
            torch.manual_seed(0)
            with device:  # initialised where it runs (an H/2 is 501M parameters)
                model = build_uvit(size, img_size=32, patch_size=2, in_chans=4, num_classes=num_classes,
                                   conv=conv[size] if isinstance(conv, dict) else conv,
                                   attention=runnable[0][0]).to(dtype).train()
            step = step_fn(model, batch, 4, device, dtype)

        def use(key):
            set_attention(model, key[0])  # noqa: F821 (freed by `del` below, after its last call)
            model.grad_checkpointing = key[1]  # noqa: F821

        for key in runnable:
            use(key)
            try:
                for _ in range(warmup):
                    step()
            except torch.cuda.OutOfMemoryError:
                status[key] = "out of memory"
            except Exception as exc:  # e.g. an xformers build without kernels for this GPU: a row, not a crash
                status[key] = "failed: " + (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
            if status[key] != "ok":
                for p in model.parameters():
                    p.grad = None
                if cuda:
                    torch.cuda.empty_cache()
        runnable = [key for key in runnable if status[key] == "ok"]
        times = {key: [] for key in runnable}
        memory = {key: 0 for key in runnable}
        for _ in range(repeats):
            for key in runnable:
                use(key)
                if cuda:
                    torch.cuda.reset_peak_memory_stats(device)
                start = time.perf_counter()
                step()
                times[key].append(time.perf_counter() - start)
                if cuda:
                    memory[key] = max(memory[key], torch.cuda.max_memory_allocated(device))
        for key in configs:
            row = {"size": f"{size}/2", "attention": key[0], "grad_checkpointing": key[1], "batch": batch,
                   "status": status[key]}
            if key in times:
                seconds = statistics.median(times[key])
                images_per_s = batch / seconds
                row.update({"steps_per_s": round(1 / seconds, 3), "images_per_s": round(images_per_s, 1),
                            "peak_memory_gb": round(memory[key] / 1e9, 1) if cuda else None,
                            "mfu": round(3 * model.flops_per_image() * images_per_s / peak, 3) if peak else None,
                            "runs": [round(t, 4) for t in times[key]]})
            rows.append(row)
            log(json.dumps(row))
        del model, step
        if cuda:
            torch.cuda.empty_cache()
    return rows


def gpu_suite(repeats: int, batch: int) -> list[dict]:
    backends = ["xformers", "sdpa"] if xformers_available() else ["sdpa"]
    return train_bench(("L", "H"), backends, (False, True), batch, repeats, warmup=3, device="cuda",
                       dtype=torch.bfloat16, conv=False)


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
