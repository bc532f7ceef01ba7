"""The latent set of a latent recipe: where `dpt-scale encode` writes it and what stage 2 and the
sampler check before reading it (same autoencoder, same images, flipped copies if wanted)."""
from __future__ import annotations

import hashlib
from pathlib import Path

from dpt_scale.diffusion.autoencoder import autoencoder_identity
from dpt_scale.errors import ShardError, UserError
from dpt_scale.layout import layout
from dpt_scale.recipe import Recipe
from dpt_scale.shards.manifest import Manifest

MOMENTS = "moments.npy"


def latent_set(recipe: Recipe) -> tuple[Path, Manifest]:
    """The finished latent set of a latent recipe, checked against it: same autoencoder, same
    images, and flipped copies if diffusion.flip wants them."""
    out, path = layout(recipe).latents, autoencoder_path(recipe)
    try:
        manifest = Manifest.load(out)
    except ShardError:
        raise UserError(f"no finished latent set at {out}: latent diffusion trains on autoencoder moments "
                        "extracted beforehand; run `dpt-scale encode RECIPE` first") from None
    made = manifest.meta.get("latent", {})
    if made.get("identity") != autoencoder_identity(path):
        raise UserError(f"{out} was encoded with another autoencoder ({made.get('autoencoder')}) than "
                        f"diffusion.latent.autoencoder={path}; run `dpt-scale encode RECIPE` to encode again")
    source = layout(recipe).train
    if made["source_digest"] != source_digest(Manifest.load(source)):
        raise UserError(f"{out} was encoded from other images than those now in {source}; "
                        "run `dpt-scale encode RECIPE` to encode again")
    if recipe.diffusion.flip and not made["flips"]:
        raise UserError(f"{out} has no flipped copies but diffusion.flip is true; "
                        "run `dpt-scale encode RECIPE` to encode again")
    return out, manifest


def autoencoder_path(recipe: Recipe) -> Path:
    path = recipe.diffusion.latent.autoencoder
    if not path:
        raise UserError("diffusion.latent.autoencoder is not set: `dpt-scale encode` is for latent recipes; set it "
                        "to a local diffusers AutoencoderKL directory, or train in pixel space without encoding")
    return Path(path)


def source_digest(images: Manifest) -> str:
    """Names the image set by its shards' names and checksums."""
    digest = hashlib.sha256("".join(f"{e.name}:{e.sha256}\n" for e in images.shards).encode())
    return "sha256:" + digest.hexdigest()[:16]
