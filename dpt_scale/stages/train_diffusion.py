"""`dpt-scale train-diffusion RECIPE`: a class-conditional U-ViT on the training shards.

Pixel space: images scaled to [-1, 1]. Latent space (diffusion.latent.autoencoder set): the latent
set `dpt-scale encode` made (stages/encode.py), a fresh z = scale (mean + exp(logvar / 2) noise)
drawn from each image's stored moments at every step, the mirror image's moments half the time
when diffusion.flip is on. Labels: the stage-1 pseudo-labels (diffusion.labels=pseudo, the DPT
setting; images the pseudo-label selection leaves out train the null class, i.e. the unconditional
model only) or the shards' own `cls` (labels=ground_truth, the oracle comparison); latents keep the image
keys, so the pseudo-labels join them exactly as they join the images.
Outputs in OUT/diffusion: checkpoints/, metrics.jsonl, samples/ (PNG grids of EMA samples, one row
per class, decoded to pixels for latent models; with diffusion.fid_samples also fid.jsonl, an
unguided in-training FID of the EMA model) and weights.pt ({"kind": "diffusion", "weights",
"ema", "settings", ..., for latent models "latent": the autoencoder the sampler decodes with, and
"init": the diffusion.init file the run started from, if any}:
a plain `build_uvit(**settings)` loads either; `diffusion.export.load_diffusion` checks it
against a recipe). diffusion.init starts a fresh run from a U-ViT checkpoint made elsewhere
(diffusion/init.py); with diffusion.train.steps 0 that checkpoint is the export, untrained.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from dpt_scale.classification.pseudo_labels import load_pseudo_labels
from dpt_scale.diffusion.autoencoder import sample_latent
from dpt_scale.diffusion.export import latent_export, model_settings, training_set
from dpt_scale.diffusion.init import load_init
from dpt_scale.diffusion.latents import MOMENTS
from dpt_scale.diffusion.loss import denoising_loss
from dpt_scale.diffusion.probe import DiffusionProbe
from dpt_scale.diffusion.schedules import build_schedule
from dpt_scale.errors import UserError
from dpt_scale.layout import layout
from dpt_scale.models import build_uvit
from dpt_scale.recipe import Recipe, save_recipe
from dpt_scale.shards.loader import ShardLoader

log = logging.getLogger(__name__)


def train_diffusion(recipe: Recipe) -> Path:
    from dpt_scale.engine.trainer import Trainer

    cfg = recipe.diffusion
    shards, manifest = training_set(recipe)
    settings = model_settings(recipe, shards, manifest)
    latent = latent_export(recipe, manifest)
    schedule = build_schedule(cfg.schedule)
    out = layout(recipe).diffusion
    export_extra = {"kind": "diffusion", "settings": settings, "schedule": cfg.schedule, "prediction": cfg.prediction,
                    "classes": manifest.classes, "labels": cfg.labels, **({"latent": latent} if latent else {}),
                    **({"init": str(cfg.init)} if cfg.init else {})}
    if cfg.train.steps == 0:  # reads no labels: nothing is trained
        return _export_init(recipe, settings, export_extra, out)
    pseudo = load_pseudo_labels(layout(recipe).pseudo_labels) if cfg.labels == "pseudo" else None
    if pseudo is None and manifest.unlabelled:
        raise UserError(f"{shards}: {manifest.unlabelled} of {manifest.num_samples} samples have no label, but "
                        "diffusion.labels=ground_truth trains on the shards' own labels; use diffusion.labels=pseudo")

    def pixels(batch: dict, device: torch.device) -> torch.Tensor:
        x = batch["image"].to(device, non_blocking=True).float().div_(127.5).sub_(1)
        if cfg.flip:
            flip = torch.rand(len(x), device=x.device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x

    def latents(batch: dict, device: torch.device) -> torch.Tensor:
        moments = batch["moments"].to(device, non_blocking=True).float()  # (B, views, 2, C, h, w)
        n = len(moments)
        view = (torch.rand(n, device=device) < 0.5).long() if cfg.flip else 0  # 1: the mirror image's
        mean, logvar = moments[torch.arange(n, device=device), view].unbind(1)
        return sample_latent(mean, logvar, latent["scale_factor"])

    def loss_fn(trainer: Trainer, batch: dict) -> torch.Tensor:
        x = (latents if latent else pixels)(batch, trainer.device)
        y = batch["cls"].to(trainer.device)
        if pseudo is None and bool((y < 0).any()):
            raise UserError(f"{shards}: samples without a label reached diffusion training with "
                            "diffusion.labels=ground_truth; use diffusion.labels=pseudo")
        y = torch.where(y < 0, manifest.num_classes, y)  # not selected for stage 2: the null class
        return denoising_loss(trainer.engine, x.to(trainer.dtype), y, schedule, cfg.label_dropout,
                                     null_class=manifest.num_classes, prediction=cfg.prediction)

    init = (lambda model: load_init(cfg.init, model, settings)) if cfg.init else None
    trainer = Trainer(cfg.train, out, model_fn=lambda: build_uvit(**settings), loss_fn=loss_fn, seed=recipe.seed,
                      export_extra=export_extra, init=init,
                      hooks=[DiffusionProbe(recipe, settings, schedule, manifest.classes, latent, out)],
                      recipe=recipe, stage="train-diffusion")
    loader = ShardLoader(shards, cfg.train.micro_batch, seed=recipe.seed, settings=recipe.data.loader, labels=pseudo,
                         field=MOMENTS if latent else None, rank=trainer.rank, world_size=trainer.world,
                         pin_memory=trainer.device.type == "cuda")
    if trainer.rank == 0:  # after the loader, which refuses a set too small for the batch
        save_recipe(recipe, out / "recipe.yaml")
    return trainer.fit(loader)


def _export_init(recipe: Recipe, settings: dict, extra: dict, out: Path) -> Path:
    """diffusion.train.steps 0: the diffusion.init checkpoint, checked, as this run's export (weights and
    EMA alike), so that `sample` and everything after it run on it with no training."""
    from dpt_scale.distributed import init_distributed
    from dpt_scale.engine.export import write_export

    rank, _, _ = init_distributed()
    model = build_uvit(**settings)
    state = {k: v.float() for k, v in load_init(recipe.diffusion.init, model, settings).items()}  # every rank checks
    weights = out / "weights.pt"
    if rank == 0:
        ema = {name: state[name] for name, p in model.named_parameters() if p.requires_grad}
        write_export(state, ema, 0, weights, extra)
        save_recipe(recipe, out / "recipe.yaml")
        log.info(f"diffusion.train.steps is 0: {recipe.diffusion.init} exported untrained as {weights}")
    torch.distributed.barrier()
    return weights
