"""`dpt-scale make-evaluator RECIPE`: an evaluation-only classifier for a data set no shipped
evaluator knows, trained on every true label of <data.root>/train.

FID, precision/recall, within-class spread and conditional accuracy are only as good as the
features and classes they are read through: Inception knows ImageNet, the shipped mnist evaluator
knows the embedded digits. This trains `evaluate.trained.model` on all training labels (the weak
view of stage 1 as augmentation) through the usual trainer, scores it on the validation shards and
writes it where `evaluate.evaluator: auto` finds it: <data.root>/evaluator-<training set's
checksum>.pt (or `evaluate.trained.weights`). Its validation top-1 is recorded in the file and
beside every conditional accuracy read through it: that is the ceiling to read them against.

Evaluation only: no stage trains on it or on its predictions. It has seen every label, so a
semi-supervised run that did would be cheating.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dpt_scale.classification.evaluate import evaluate_classifier
from dpt_scale.data.augment import weak
from dpt_scale.distributed import init_distributed
from dpt_scale.errors import UserError, check_writable
from dpt_scale.layout import layout
from dpt_scale.metrics.evaluators import trained_evaluator_path
from dpt_scale.models.classifier import ImageClassifier, load_classifier
from dpt_scale.recipe import Recipe
from dpt_scale.recipe.schema import Train
from dpt_scale.shards.loader import ShardLoader
from dpt_scale.shards.manifest import MANIFEST, Manifest

log = logging.getLogger(__name__)


def make_evaluator(recipe: Recipe) -> Path:
    from dpt_scale.engine.trainer import Trainer

    cfg = recipe.evaluate.trained
    rank, world, device = init_distributed()
    train_dir, val_dir = layout(recipe).train, layout(recipe).val
    manifest = Manifest.load(train_dir)
    if manifest.unlabelled or not sum(manifest.class_histogram):
        raise UserError(f"{train_dir}: {manifest.unlabelled or manifest.num_samples} image(s) carry no label; an "
                        "evaluator learns from every true label, so import the set with its labels")
    if not (val_dir / MANIFEST).is_file():
        raise UserError(f"no validation shards at {val_dir}: an evaluator's own accuracy must be measured on images "
                        "it never saw; import a validation split (e.g. data.val_fraction)")
    size, channels = manifest.square_size(train_dir, "an evaluator"), manifest.image["channels"]
    target = Path(cfg.weights or trained_evaluator_path(recipe.data_root, manifest))
    check_writable(target.parent, "set evaluate.trained.weights to a file")
    work = target.with_name(target.name.removesuffix(".pt") + ".train")
    settings = dict(name=cfg.model, num_classes=manifest.num_classes, in_chans=channels, img_size=size,
                    mean=[0.5] * channels, std=[0.5] * channels, frozen_backbone=False, input_size=None)
    train = Train(steps=cfg.steps, micro_batch=cfg.micro_batch, lr=cfg.lr, weight_decay=0.05, betas=[0.9, 0.999],
                  warmup_steps=min(100, cfg.steps // 10), lr_schedule="cosine", ema_decay=0.999, zero_stage=0,
                  checkpoint_every=max(1, cfg.steps // 4), log_every=max(1, min(50, cfg.steps // 10)))

    def loss(trainer, batch: dict) -> torch.Tensor:
        images = batch["image"].to(trainer.device, non_blocking=True)
        return F.cross_entropy(trainer.engine(images).float(), batch["cls"].to(trainer.device))

    trainer = Trainer(train, work, model_fn=lambda: ImageClassifier(**settings), loss_fn=loss, seed=recipe.seed,
                      export_extra={"kind": "classifier", "settings": settings, "classes": manifest.classes,
                                    "method": "evaluator", "stage": "make-evaluator"},
                      recipe=recipe, stage="make-evaluator")
    loader = ShardLoader(train_dir, train.micro_batch, seed=recipe.seed, transform=weak(cfg.augment, size),
                         settings=recipe.data.loader, rank=trainer.rank, world_size=trainer.world,
                         pin_memory=device.type == "cuda")
    weights = trainer.fit(loader)
    scores = evaluate_classifier(load_classifier(weights, device=device), val_dir, recipe.classifier.pseudo_label.batch,
                                 device, recipe.classifier.pseudo_label.workers)
    if rank == 0:
        payload = torch.load(weights, map_location="cpu", weights_only=False)
        payload.update(val_top1=scores["top1"], val_samples=scores["samples"], evaluation_only=True,
                       trained_on={"shards": str(train_dir), "identity": manifest.identity(),
                                   "images": manifest.num_samples})
        tmp = target.with_name(target.name + ".tmp")
        torch.save(payload, tmp)
        os.replace(tmp, target)
        (work / "eval.json").write_text(json.dumps({k: scores[k] for k in ("top1", "top5", "samples", "per_class")},
                                                   indent=1))
        log.info(f"evaluator {target}: top-1 {scores['top1']:.4f} on {scores['samples']} validation images "
                 "(evaluation only; `evaluate.evaluator: auto` now finds it)")
    if world > 1:
        dist.barrier()
    return target
