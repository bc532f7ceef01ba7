"""Train the MNIST evaluator that ships in `dpt_scale/assets/mnist_evaluator.pt`.

Evaluation only: `dpt-scale evaluate` uses it as the feature extractor for FID/KID/precision/recall
on 1-channel 28x28 sets (Inception features mean little on digits) and as the judge of conditional
accuracy. No stage ever trains on it or on its predictions, so a semi-supervised run cannot profit
from the labels it saw.

It is trained once, by a maintainer, on ALL 10,000 labelled training images of the embedded MNIST
subset (dpt_scale/assets/mnist_subset.npz), with random translations of up to 3 px, in a plain
torch loop on the CPU (30 epochs: about 2.5 minutes on 2 idle cores, 7 when they are shared).
Shipped file: timm `test_resnet` through `ImageClassifier`, float32 (1.5 MB), loads with
`dpt_scale.models.load_classifier`; top-1 on the subset's 2,000 validation images (drawn from the
original MNIST test set, never trained on): 98.80%.

    python tools/make_mnist_evaluator.py
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dpt_scale.data.augment import weak
from dpt_scale.data.sources import SOURCES
from dpt_scale.models.classifier import ImageClassifier
from dpt_scale.recipe.schema import Augment, Data

OUT = Path(__file__).resolve().parents[1] / "dpt_scale" / "assets" / "mnist_evaluator.pt"
MODEL = "test_resnet"  # 0.37M parameters: 1.5 MB in float32


def split(source, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    items = source.splits[name]
    images = torch.from_numpy(np.stack([image for _, image, _ in items]))[:, None]  # (N, 1, 28, 28) uint8
    return images, torch.tensor([label for _, _, label in items])


@torch.no_grad()
def top1(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    predictions = torch.cat([model(images[i:i + 500]).argmax(1) for i in range(0, len(images), 500)])
    return (predictions == labels).float().mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    source = SOURCES["mnist"](Data())
    train_x, train_y = split(source, "train")
    val_x, val_y = split(source, "val")
    # The training recipe's weak view (reflect-padded random crop), 3 px on a 28 px digit; no flips.
    shift = weak(Augment(translate=0.1, flip=False), 28)
    settings = dict(name=MODEL, num_classes=10, in_chans=1, img_size=28, mean=[0.5], std=[0.5],
                    frozen_backbone=False, input_size=None)
    model = ImageClassifier(**settings)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    steps = args.epochs * (len(train_x) // args.batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=steps)
    start = time.time()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(train_x))
        for i in range(0, len(order) - args.batch + 1, args.batch):  # drop the ragged last batch
            idx = order[i:i + args.batch]
            images = torch.stack([shift(image) for image in train_x[idx]])
            loss = nn.functional.cross_entropy(model(images), train_y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        if epoch % 5 == 4 or epoch == args.epochs - 1:
            print(f"epoch {epoch + 1}: loss {loss.item():.4f}, val top-1 {top1(model, val_x, val_y):.4f} "
                  f"({time.time() - start:.0f} s)", flush=True)

    accuracy = top1(model, val_x, val_y)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # The export format `load_classifier` reads. No EMA was kept: "ema" is empty, so the plain
    # weights load either way.
    payload = {"kind": "classifier", "settings": settings, "weights": weights, "ema": {}, "step": steps,
               "classes": source.classes, "method": "supervised", "stage": "evaluator",
               "val_top1": accuracy, "trained_on": "dpt_scale/assets/mnist_subset.npz train (all 10,000 labels)"}
    torch.save(payload, args.out)
    size = Path(args.out).stat().st_size
    print(f"wrote {args.out}: val top-1 {accuracy:.4f} on {len(val_x)} images, {size / 1e6:.2f} MB, "
          f"{time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
