"""How good are stage-0 backbones for the few-label probe? One table for several backbone files.

    python bench/backbones.py runs/a/pretrain/backbone.pt runs/b/pretrain/backbone.pt \
        --data runs/mnist-probe/data --labels 1,2,5 --seeds 0,1,2,3,4

For each backbone.pt (made by `dpt-scale pretrain`; its file says the architecture): the k-NN top-1
on the validation images (leave-one-out, as the pretrain probe logs it), and the top-1 of a linear
probe fit on K labelled training images per class, for each K and label seed, as mean ± std. The
probe is the stage-1 one (L2-normalised features centred on the labelled mean, multinomial logistic
regression with penalty 0.5 l2 |W|^2), fit to convergence with L-BFGS rather than by the trainer,
so that backbones are compared without an optimiser budget in between. Evaluation only: the
training labels pick the K images per class and nothing else.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count()))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine  # noqa: E402

from dpt_scale.models.classifier import ImageClassifier, pretrain_meta  # noqa: E402
from dpt_scale.pretrain.knn import knn_top1  # noqa: E402
from dpt_scale.shards.manifest import Manifest  # noqa: E402
from dpt_scale.shards.map_shards import map_shards  # noqa: E402


@torch.no_grad()
def features(model: ImageClassifier, directory: Path) -> tuple[torch.Tensor, torch.Tensor]:
    shards = list(range(len(Manifest.load(directory).shards)))
    parts = list(map_shards(model.features, directory, shards, 512, torch.device("cpu"), 0, read_labels=True))
    return torch.cat([p.outputs for p in parts]), torch.cat([p.labels for p in parts])


def probe(train: torch.Tensor, labels: torch.Tensor, val: torch.Tensor, val_labels: torch.Tensor, per_class: int,
          seed: int, l2: float) -> float:
    rng = random.Random(seed)
    chosen = [i for c in labels.unique().tolist() for i in rng.sample(torch.nonzero(labels == c).flatten().tolist(),
                                                                        per_class)]
    x, y = train[chosen], labels[chosen]
    mean = x.mean(0)
    weight = torch.zeros(train.shape[1], int(labels.max()) + 1, requires_grad=True)
    bias = torch.zeros(int(labels.max()) + 1, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy((x - mean) @ weight + bias, y) + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return (((val - mean) @ weight + bias).argmax(1) == val_labels).float().mean().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("backbones", nargs="+")
    p.add_argument("--data", required=True, help="the data root: DATA/train and DATA/val shard sets")
    p.add_argument("--labels", default="1,2,5", help="labelled images per class")
    p.add_argument("--seeds", default="0,1,2,3,4", help="label seeds")
    p.add_argument("--l2", type=float, default=1e-4)
    args = p.parse_args()
    data = Path(args.data)
    manifest = Manifest.load(data / "train")
    rows = []
    for path in args.backbones:
        meta = pretrain_meta(path) or {}
        model = ImageClassifier(meta["model"], 1, meta["in_chans"], meta["img_size"], meta["mean"], meta["std"],
                                pretrained=path, frozen_backbone=True, input_size=meta.get("input_size"),
                                crop_pct=meta.get("crop_pct"), model_kwargs=meta.get("kwargs")).eval()
        train, labels = features(model, data / "train")
        val, val_labels = features(model, data / "val")
        row = {"backbone": path, "method": meta.get("method"), "model": meta["model"], "steps": meta.get("steps"),
               "knn_top1": round(knn_top1(val, val_labels, 20), 4)}
        for k in map(int, args.labels.split(",")):
            accs = [probe(train, labels, val, val_labels, k, s, args.l2) for s in map(int, args.seeds.split(","))]
            row[f"probe_{k}"] = {"mean": round(statistics.mean(accs), 4), "std": round(statistics.stdev(accs), 4)
                                 if len(accs) > 1 else None, "runs": [round(a, 4) for a in accs]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(json.dumps({"machine": machine(), "images": {"train": manifest.num_samples}, "backbones": rows}, indent=1))


if __name__ == "__main__":
    main()
