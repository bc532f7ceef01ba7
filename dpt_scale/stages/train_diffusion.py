"""`dpt-scale train-diffusion RECIPE`: a class-conditional U-ViT on the training shards.

Pixel space: images scaled to [-1, 1], labels from the shards' `cls`. Outputs in OUT/diffusion:
checkpoints/, metrics.jsonl, samples/ (PNG grids of EMA samples, one row per class) and
weights.pt ({"weights", "ema", "settings", ...}: a plain `build_uvit(**settings)` loads either).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torchvision.utils import save_image

from dpt_scale.diffusion.loss import noise_prediction_loss
from dpt_scale.diffusion.sampling import sample
from dpt_scale.diffusion.schedules import build_schedule
from dpt_scale.errors import UserError
from dpt_scale.models import build_uvit
from dpt_scale.recipe import Recipe, save_recipe
from dpt_scale.shards.loader import ShardLoader
from dpt_scale.shards.manifest import Manifest

GRID_PER_CLASS = 8  # samples per class in the periodic grid
GRID_STEPS = 25


def model_settings(recipe: Recipe, manifest: Manifest) -> dict:
    cfg = recipe.diffusion.model
    size = manifest.square_size(Path(recipe.data_root) / "train", "diffusion training")
    if size % cfg.patch_size:
        raise UserError(f"image size {size} is not a multiple of diffusion.model.patch_size {cfg.patch_size}")
    return dict(size=cfg.size, img_size=size, patch_size=cfg.patch_size, in_chans=manifest.image["channels"],
                num_classes=manifest.num_classes, conv=cfg.conv, mlp_time_embed=cfg.mlp_time_embed,
                qkv_bias=cfg.qkv_bias, attention=cfg.attention, grad_checkpointing=cfg.grad_checkpointing)


def train_diffusion(recipe: Recipe) -> Path:
    from dpt_scale.engine.trainer import Trainer

    cfg = recipe.diffusion
    if cfg.latent.autoencoder:
        raise UserError("latent diffusion trains on latent shards made by `dpt-scale encode`, which this "
                        "release does not have yet; leave diffusion.latent.autoencoder unset for pixel space")
    shards = Path(recipe.data_root) / "train"
    manifest = Manifest.load(shards)
    settings = model_settings(recipe, manifest)
    schedule = build_schedule(cfg.schedule)
    out = Path(recipe.out) / "diffusion"

    def loss_fn(trainer: Trainer, batch: dict) -> torch.Tensor:
        x = batch["image"].to(trainer.device, non_blocking=True).float().div_(127.5).sub_(1)
        if cfg.flip:
            flip = torch.rand(len(x), device=x.device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        y = batch["cls"].to(trainer.device)
        if bool((y < 0).any()):
            raise UserError(f"{shards}: samples without a label reached diffusion training")
        return noise_prediction_loss(trainer.engine, x.to(trainer.dtype), y, schedule, cfg.label_dropout,
                                     null_class=manifest.num_classes)

    def sample_grid(trainer: Trainer, step: int) -> None:
        ema = trainer.ema.full_state_dict()  # a collective under ZeRO-3: every rank takes part
        if trainer.rank == 0:
            model = build_uvit(**settings).to(trainer.device).eval()
            model.load_state_dict(ema)
            labels = torch.arange(manifest.num_classes, device=trainer.device).repeat_interleave(GRID_PER_CLASS)
            generator = torch.Generator(device=trainer.device).manual_seed(recipe.seed)
            noise = torch.randn(len(labels), settings["in_chans"], settings["img_size"], settings["img_size"],
                                generator=generator, device=trainer.device)
            x = sample(model, schedule, labels, noise.shape[1:], GRID_STEPS, null_class=manifest.num_classes,
                       noise=noise)
            (out / "samples").mkdir(parents=True, exist_ok=True)
            save_image((x.float() + 1) / 2, out / "samples" / f"step-{step:08d}.png", nrow=GRID_PER_CLASS)
        dist.barrier()

    trainer = Trainer(cfg.train, out, model_fn=lambda: build_uvit(**settings), loss_fn=loss_fn, seed=recipe.seed,
                      export_extra={"settings": settings, "schedule": cfg.schedule, "classes": manifest.classes},
                      hooks=[sample_grid])
    if trainer.rank == 0:
        save_recipe(recipe, out / "recipe.yaml")
    loader_cfg = recipe.data.loader
    loader = ShardLoader(shards, cfg.train.micro_batch, seed=recipe.seed, workers=loader_cfg.workers,
                         streams=loader_cfg.streams, shuffle_buffer=loader_cfg.shuffle_buffer,
                         on_corrupt=loader_cfg.on_corrupt, pin_memory=trainer.device.type == "cuda")
    return trainer.fit(loader)
