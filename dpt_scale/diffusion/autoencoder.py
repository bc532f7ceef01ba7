"""The latent autoencoder: Stable Diffusion's KL-f8 VAE through diffusers' AutoencoderKL, loaded from
a local directory only (nothing is downloaded). Images in [-1, 1]; latents scaled by `scale_factor`
(0.18215 for SD's VAE) so that they have about unit variance.

`autoencoder_identity` names an autoencoder by content, so that latents encoded with one are never
trained or decoded with another (a copied folder keeps its identity, a retrained one does not)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from dpt_scale.errors import UserError

WEIGHT_SUFFIXES = (".safetensors", ".bin")  # the weight files diffusers reads from the folder


def _checked(path: str | Path) -> Path:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise UserError(f"autoencoder not found: {path} must be a local diffusers AutoencoderKL directory "
                        "(config.json + weights, e.g. the 'vae' folder of Stable Diffusion); nothing is downloaded")
    return path


def autoencoder_identity(path: str | Path) -> str:
    """A checksum of the autoencoder's config and weight files."""
    path = _checked(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.iterdir() if p.name == "config.json" or p.suffix in WEIGHT_SUFFIXES):
        digest.update(file.name.encode() + b"\0")
        with open(file, "rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return "sha256:" + digest.hexdigest()[:16]


def sample_latent(mean: torch.Tensor, logvar: torch.Tensor, scale_factor: float) -> torch.Tensor:
    """A scaled latent drawn from posterior moments (training re-draws one every time it sees an image)."""
    return scale_factor * (mean + torch.exp(0.5 * logvar) * torch.randn_like(mean))


class LatentAutoencoder(nn.Module):
    def __init__(self, path: str | Path, scale_factor: float | None = None):
        super().__init__()
        from diffusers import AutoencoderKL  # imported here: only latent recipes need diffusers loaded

        path = _checked(path)
        self.vae = AutoencoderKL.from_pretrained(path, low_cpu_mem_usage=False, local_files_only=True).eval()
        self.vae.requires_grad_(False)
        self.scale_factor = scale_factor or self.vae.config.scaling_factor

    @property
    def in_channels(self) -> int:
        return self.vae.config.in_channels

    def latent_shape(self, size: int) -> tuple[int, int, int]:
        """(channels, side, side) of the latents of size x size images; the side must divide."""
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)  # one 2x downsampling per block but the last
        if size % factor:
            raise UserError(f"image size {size} is not a multiple of the autoencoder's downsampling factor "
                            f"{factor}; import the images at a size that is (data.image_size)")
        return self.vae.config.latent_channels, size // factor, size // factor

    @torch.no_grad()
    def moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of the posterior for images in [-1, 1] (unscaled)."""
        posterior = self.vae.encode(images).latent_dist
        return posterior.mean, posterior.logvar

    def sample(self, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """A scaled latent drawn from stored moments."""
        return sample_latent(mean, logvar, self.scale_factor)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """Images in about [-1, 1] from scaled latents, `chunk` at a time if given (the decoder's
        activations at full resolution are what bounds memory)."""
        chunk = chunk or len(latents)
        return torch.cat([self.vae.decode(latents[i:i + chunk] / self.scale_factor).sample
                          for i in range(0, len(latents), chunk)])
