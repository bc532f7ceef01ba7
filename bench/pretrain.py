"""Stage-0 pretraining throughput against the model alone, in one run.

    python bench/pretrain.py --recipe recipes/mnist-probe.yaml --steps 60 --repeats 3
    python bench/pretrain.py --recipe RECIPE --set pretrain.method=msn ...   # a GPU is used when there is one

(a) the pretrain path: the DeepSpeed trainer over the ShardLoader (workers as the recipe says), the
    method's views and loss, the EMA update, metrics, as `dpt-scale pretrain` runs it (no k-NN
    probe, no checkpoint inside the timed window);
(b) the model alone: the same network and loss with a plain torch AdamW step, over the same
    batches decoded into memory beforehand.
Goal: (a) / (b) >= 0.9. Both run in fp32 (the plain loop has no bf16 engine). Images/s count
images, not views. The two alternate for `--repeats` rounds; rates are medians, the ratio is the
median of the rounds' ratios.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count()))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine  # noqa: E402

from dpt_scale.models.classifier import ImageClassifier  # noqa: E402
from dpt_scale.pretrain import build_method  # noqa: E402
from dpt_scale.pretrain.net import PretrainNet  # noqa: E402
from dpt_scale.recipe import load_recipe  # noqa: E402
from dpt_scale.shards.loader import ShardLoader  # noqa: E402
from dpt_scale.shards.manifest import Manifest  # noqa: E402
from dpt_scale.stages.pretrain import encoder_settings  # noqa: E402


def throughput(recipe, steps: int, repeats: int) -> dict:
    from dpt_scale.engine.trainer import Trainer

    cfg = recipe.pretrain
    train_dir = Path(recipe.data_root) / "train"
    manifest = Manifest.load(train_dir)
    encoder = encoder_settings(recipe, manifest, train_dir)
    method = build_method(cfg)

    def model_fn():
        backbone = ImageClassifier(**encoder)
        return PretrainNet(backbone, method.head(backbone.net.num_features))

    ld = recipe.data.loader
    batch = cfg.train.micro_batch
    # the timed window is the second half: the first steps warm the loader's workers and allocator up
    train = dataclasses.replace(cfg.train, steps=steps, log_every=steps // 2, checkpoint_every=10**9, precision="fp32",
                                warmup_steps=0, lr_schedule="constant")

    def loader(workers: int) -> ShardLoader:
        return ShardLoader(train_dir, batch, rank=0, world_size=1, seed=0, labels={},
                           settings=dataclasses.replace(recipe.data.loader, workers=workers))

    def pipeline() -> float:
        with tempfile.TemporaryDirectory() as out:
            trainer = Trainer(train, out, model_fn=model_fn, loss_fn=method.loss, seed=0)
            if hasattr(method, "attach"):
                method.attach(trainer, model_fn)
            trainer.fit(loader(ld.workers))
            rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
            return rows[-1]["images_per_s"]

    batches = []
    for b in loader(0).batches(0):
        batches.append({"image": b["image"].clone()})
        if len(batches) == steps:
            break

    def model_only() -> float:
        torch.manual_seed(0)
        model = model_fn().to(device)
        shim = _Shim(model, device)
        if hasattr(method, "attach"):
            method.attach(shim, model_fn)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=train.lr,
                                      betas=tuple(train.betas), weight_decay=train.weight_decay)
        start = None
        for i, b in enumerate(batches):
            if i == steps // 2:
                start = time.perf_counter()
            loss = method.loss(shim, b)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            shim.ema.update(i + 1)
        return batch * (steps - steps // 2) / (time.perf_counter() - start)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model_only()  # warm-up
    runs = {"pipeline": [], "model_only": []}
    for _ in range(repeats):
        runs["pipeline"].append(pipeline())
        runs["model_only"].append(model_only())
    return {"method": cfg.method, "model": encoder["name"], "batch": batch, "steps": steps,
            "workers": ld.workers, "image": [encoder["in_chans"], encoder["img_size"], encoder["img_size"]],
            "images_per_s": {k: round(statistics.median(v), 1) for k, v in runs.items()},
            "ratio": round(statistics.median(a / b for a, b in zip(runs["pipeline"], runs["model_only"])), 3),
            "runs": {k: [round(x, 1) for x in v] for k, v in runs.items()}}


class _Shim:
    """What a method's loss reads of the trainer, for the plain loop: the model as `engine`, the
    device, and an EMA (the target network of methods that have one; updated as the trainer does)."""

    def __init__(self, model, device):
        from dpt_scale.engine.ema import ShardedEMA

        self.engine, self.device = model, device
        self.ema = ShardedEMA(model, 0.99)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="recipes/mnist-probe.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    recipe = load_recipe(args.recipe, args.overrides)
    print(json.dumps({"machine": machine(), **throughput(recipe, args.steps, args.repeats)}, indent=1))


if __name__ == "__main__":
    main()
