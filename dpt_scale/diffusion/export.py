"""A stage-2 model as the recipe describes it: what it trains on, its constructor arguments, and
loading its export (`weights.pt`) checked against the recipe, for the sampler and for tools."""
from __future__ import annotations

from pathlib import Path

import torch

from dpt_scale.data.importer import check_settings
from dpt_scale.diffusion.latents import latent_set
from dpt_scale.engine.export import load_export
from dpt_scale.errors import UserError
from dpt_scale.layout import layout
from dpt_scale.models import build_uvit
from dpt_scale.recipe import Recipe
from dpt_scale.shards.manifest import Manifest

# Settings that only change how the model runs, not what it computes: a checkpoint may differ in them.
RUNTIME_SETTINGS = ("attention", "grad_checkpointing")


def training_set(recipe: Recipe) -> tuple[Path, Manifest]:
    """What stage 2 trains on: the image shards, or for latent recipes their checked latent set."""
    if recipe.diffusion.latent.autoencoder:
        return latent_set(recipe)
    directory = layout(recipe).train
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
