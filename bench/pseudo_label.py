"""Pseudo-labelling throughput against the model alone, in one run.

    python bench/pseudo_label.py --shards runs/mnist-cpu/data/train --model resnet10t
    python bench/pseudo_label.py --shards SHARDS --model vit_base_patch16_224 --gpu   # on a GPU machine

(a) the pseudo-label path: `map_shards` over whole shards (background decoding workers) with
    the classifier's softmax, as `dpt-scale pseudo-label` runs it, minus writing the small sidecars;
(b) the model alone: the same images, decoded into memory beforehand, the same batches, the same
    forward pass.
Goal: (a) / (b) >= 0.9. The two alternate for `--repeats` rounds; rates are medians, the ratio
is the median of the rounds' ratios.
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

from dpt_scale.models.classifier import ImageClassifier  # noqa: E402
from dpt_scale.shards.manifest import Manifest  # noqa: E402
from dpt_scale.shards.map_shards import map_shards  # noqa: E402


def throughput(shards: str | Path, model_name: str = "resnet10t", batch: int = 256, workers: int = 1,
               repeats: int = 3, input_size: int | None = None, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32, crop_pct: float | None = None) -> dict:
    """(a) the pseudo-label path and (b) the model alone over the shard set `shards`, alternating for
    `repeats` rounds after one model-only warm-up; medians. `input_size` / `crop_pct`: the classifier's
    resize / centre crop inside the model (ImageClassifier)."""
    device = torch.device(device)
    manifest = Manifest.load(shards)
    size, channels = manifest.image["size"][0], manifest.image["channels"]
    model = ImageClassifier(model_name, manifest.num_classes, channels, size, [0.5] * channels, [0.5] * channels,
                            input_size=input_size, crop_pct=crop_pct).to(device, dtype).eval()
    indices = list(range(len(manifest.shards)))
    fn = lambda x: model(x).float().softmax(1)  # noqa: E731

    # The same batches the pseudo-label path forms (whole shards, cut into `batch`), decoded once.
    batches = [b for part in map_shards(lambda x: x, shards, indices, batch, torch.device("cpu"), 0)
               for b in part.outputs.split(batch)]
    images = sum(len(b) for b in batches)

    def pipeline() -> float:
        start = time.perf_counter()
        for _ in map_shards(fn, shards, indices, batch, device, workers):
            pass
        sync()
        return images / (time.perf_counter() - start)

    @torch.no_grad()
    def model_only() -> float:
        start = time.perf_counter()
        for b in batches:
            fn(b.to(device, non_blocking=True)).cpu()
        sync()
        return images / (time.perf_counter() - start)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    model_only()  # warm-up (allocator, kernels)
    runs = {"pipeline": [], "model_only": []}
    for _ in range(repeats):
        runs["pipeline"].append(pipeline())
        runs["model_only"].append(model_only())
    medians = {k: statistics.median(v) for k, v in runs.items()}
    return {"model": model_name, "images": images, "batch": batch, "workers": workers,
            "image": [channels, size, size], "dtype": str(dtype),
            "images_per_s": {k: round(v, 1) for k, v in medians.items()},
            # each repeat's pair ran back to back: their ratio is what this host's drift leaves alone
            "ratio": round(statistics.median(a / b for a, b in zip(runs["pipeline"], runs["model_only"])), 3),
            "runs": {k: [round(x, 1) for x in v] for k, v in runs.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", required=True)
    p.add_argument("--model", default="resnet10t")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--input-size", type=int, default=None, help="resize inside the model (e.g. 224 for a ViT-B)")
    p.add_argument("--gpu", action="store_true", help="CUDA, bf16")
    args = p.parse_args()
    result = throughput(args.shards, args.model, args.batch, args.workers, args.repeats, args.input_size,
                        torch.device("cuda" if args.gpu else "cpu"), torch.bfloat16 if args.gpu else torch.float32)
    print(json.dumps({"machine": machine(), **result}, indent=1))


if __name__ == "__main__":
    main()
