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
"ema", "settings", ..., and for latent models "latent": the autoencoder the sampler decodes with}:
a plain `build_uvit(**settings)` loads either; `load_diffusion` checks it against a recipe).
"""
from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

import torch
import torch.distributed as dist
from torchvision.utils import save_image

from dpt_scale.classification.pseudo_labels import load_pseudo_labels
from dpt_scale.data.importer import check_settings
from dpt_scale.diffusion.autoencoder import LatentAutoencoder, sample_latent
from dpt_scale.diffusion.loss import denoising_loss
from dpt_scale.diffusion.sampling import sample, to_uint8
from dpt_scale.diffusion.schedules import build_schedule
from dpt_scale.engine.export import load_export
from dpt_scale.errors import UserError
from dpt_scale.metrics.generation import image_metrics, reference_for
from dpt_scale.models import build_uvit
from dpt_scale.recipe import Recipe, save_recipe
from dpt_scale.shards.loader import ShardLoader
from dpt_scale.shards.manifest import Manifest
from dpt_scale.stages.encode import MOMENTS, latent_set

log = logging.getLogger(__name__)
GRID_PER_CLASS = 8  # samples per class in the periodic grid
GRID_CLASSES = 16  # rows at most: ImageNet's 1,000 classes would make an 8,000-image grid
GRID_STEPS = 25


def training_set(recipe: Recipe) -> tuple[Path, Manifest]:
    """What stage 2 trains on: the image shards, or for latent recipes their checked latent set."""
    if recipe.diffusion.latent.autoencoder:
        return latent_set(recipe)
    directory = Path(recipe.data_root) / "train"
    manifest = Manifest.load(directory)
    check_settings(recipe, directory, manifest)
    return directory, manifest


def model_settings(recipe: Recipe, directory: Path, manifest: Manifest) -> dict:
    """The U-ViT's constructor arguments for the training set: its input is the images, or the latents."""
    cfg = recipe.diffusion.model
    latent = manifest.meta.get("latent")
    if latent:
        space, (channels, size, _) = "latent", latent["shape"]
    else:
        size = manifest.square_size(directory, "diffusion training")
        space, channels = "image", manifest.image["channels"]
    if size % cfg.patch_size:
        raise UserError(f"{space} size {size} is not a multiple of diffusion.model.patch_size {cfg.patch_size}")
    return dict(size=cfg.size, img_size=size, patch_size=cfg.patch_size, in_chans=channels,
                num_classes=manifest.num_classes, conv=cfg.conv, mlp_time_embed=cfg.mlp_time_embed,
                qkv_bias=cfg.qkv_bias, attention=cfg.attention, grad_checkpointing=cfg.grad_checkpointing)


def latent_export(recipe: Recipe, manifest: Manifest) -> dict | None:
    """The export's "latent" entry (what the sampler decodes with); None in pixel space."""
    latent = manifest.meta.get("latent")
    if not latent:
        return None
    return {"autoencoder": str(recipe.diffusion.latent.autoencoder), "identity": latent["identity"],
            "scale_factor": recipe.diffusion.latent.scale_factor or latent["scale_factor"]}


# Settings that only change how the model runs, not what it computes: a checkpoint may differ in them.
RUNTIME_SETTINGS = ("attention", "grad_checkpointing")


def load_diffusion(recipe: Recipe, path: str | Path, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """The EMA U-ViT of a train-diffusion export, checked against the recipe's model (and, for
    latent recipes, its autoencoder and scale); returns (model in eval mode, the export's other entries)."""
    payload = load_export(path, "diffusion", "run `dpt-scale train-diffusion` first, or set sample.checkpoint to "
                                             "the weights.pt it makes")
    directory, manifest = training_set(recipe)
    expected = model_settings(recipe, directory, manifest)
    differ = [f"{k}={payload['settings'].get(k)!r} (recipe: {v!r})" for k, v in expected.items()
              if k not in RUNTIME_SETTINGS and payload["settings"].get(k) != v]
    ours, theirs = latent_export(recipe, manifest), payload.get("latent")
    if _space(ours) != _space(theirs):  # the autoencoder's folder may have moved: compare its identity
        differ.append(f"latent={_space(theirs)} (recipe: {_space(ours)})")
    if differ:
        raise UserError(f"{path} does not match the recipe's model: it has {', '.join(differ)}; point "
                        "sample.checkpoint at weights of this model, or make diffusion.model match them")
    settings = {**payload["settings"], "attention": recipe.diffusion.model.attention, "grad_checkpointing": False}
    model = build_uvit(**settings)
    model.load_state_dict({**payload["weights"], **payload["ema"]})
    return model.to(device).eval(), payload


def _space(latent: dict | None) -> str:
    return "pixels" if latent is None else f"autoencoder {latent['identity']} x {latent['scale_factor']}"


def train_diffusion(recipe: Recipe) -> Path:
    from dpt_scale.engine.trainer import Trainer

    cfg = recipe.diffusion
    shards, manifest = training_set(recipe)
    settings = model_settings(recipe, shards, manifest)
    latent = latent_export(recipe, manifest)
    schedule = build_schedule(cfg.schedule)
    out = Path(recipe.out) / "diffusion"
    pseudo = load_pseudo_labels(Path(recipe.out) / "pseudo_labels") if cfg.labels == "pseudo" else None
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

    @functools.cache
    def autoencoder(device: torch.device) -> LatentAutoencoder:
        """Latent models: the grids' decoder, loaded once, by rank 0 only."""
        return LatentAutoencoder(latent["autoencoder"], latent["scale_factor"]).to(device)

    def generate(model: torch.nn.Module, labels: torch.Tensor, seed: int) -> torch.Tensor:
        """Unguided EMA samples as pixels in [-1, 1], as the reference's in-training FID takes them."""
        generator = torch.Generator(device=labels.device).manual_seed(seed)
        noise = torch.randn(len(labels), settings["in_chans"], settings["img_size"], settings["img_size"],
                            generator=generator, device=labels.device)
        x = sample(model, schedule, labels, noise.shape[1:], GRID_STEPS, null_class=manifest.num_classes, noise=noise,
                   prediction=cfg.prediction)
        return autoencoder(labels.device).decode(x.float(), chunk=recipe.sample.decode_batch) if latent else x

    reference = {}  # the in-training FID's evaluator and reference features, fetched once

    def probe(trainer: Trainer, step: int) -> None:
        """Every train.sample_every steps: a PNG grid of EMA samples, one row per class (16 classes
        at most, evenly spaced), and with diffusion.fid_samples an in-training FID (+ conditional
        accuracy) appended to fid.jsonl."""
        ema = trainer.ema.full_state_dict()  # a collective under ZeRO-3: every rank takes part
        if cfg.fid_samples and not reference:
            reference["evaluator"], reference["features"] = reference_for(recipe, trainer.device)  # collective
        if trainer.rank == 0:
            model = build_uvit(**settings).to(trainer.device).eval()
            model.load_state_dict(ema)
            device, classes = trainer.device, manifest.num_classes
            rows = torch.linspace(0, classes - 1, min(classes, GRID_CLASSES), device=device).round().long()
            grid = rows.repeat_interleave(GRID_PER_CLASS)
            x = torch.cat([generate(model, grid[i:i + recipe.sample.batch], recipe.seed + i)
                           for i in range(0, len(grid), recipe.sample.batch)])
            (out / "samples").mkdir(parents=True, exist_ok=True)
            save_image((x.float() + 1) / 2, out / "samples" / f"step-{step:08d}.png", nrow=GRID_PER_CLASS)
            if cfg.fid_samples:
                labels = torch.arange(cfg.fid_samples, device=device) % classes
                images = torch.cat([to_uint8(generate(model, labels[i:i + recipe.sample.batch], recipe.seed + 1 + i))
                                    for i in range(0, len(labels), recipe.sample.batch)])
                metrics = image_metrics(reference["evaluator"], reference["features"], images, labels,
                                        manifest.classes, recipe.evaluate.kid_subset_size, recipe.evaluate.batch)
                with open(out / "fid.jsonl", "a") as f:
                    f.write(json.dumps({"step": step, **metrics}) + "\n")
                log.info(f"step {step}: in-training FID {metrics['fid']:.3f} ({cfg.fid_samples} unguided EMA samples), "
                         f"conditional accuracy {metrics['conditional_accuracy']}")
        dist.barrier()

    trainer = Trainer(cfg.train, out, model_fn=lambda: build_uvit(**settings), loss_fn=loss_fn, seed=recipe.seed,
                      export_extra={"kind": "diffusion", "settings": settings, "schedule": cfg.schedule,
                                    "prediction": cfg.prediction,
                                    "classes": manifest.classes, "labels": cfg.labels,
                                    **({"latent": latent} if latent else {})},
                      hooks=[probe])
    loader_cfg = recipe.data.loader
    loader = ShardLoader(shards, cfg.train.micro_batch, seed=recipe.seed, workers=loader_cfg.workers,
                         streams=loader_cfg.streams, shuffle_buffer=loader_cfg.shuffle_buffer,
                         on_corrupt=loader_cfg.on_corrupt, pin_memory=trainer.device.type == "cuda", labels=pseudo,
                         field=MOMENTS if latent else None)
    if trainer.rank == 0:  # after the loader, which refuses a set too small for the batch
        save_recipe(recipe, out / "recipe.yaml")
    return trainer.fit(loader)
