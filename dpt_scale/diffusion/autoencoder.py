"""The latent autoencoder: Stable Diffusion's KL-f8 VAE through diffusers' AutoencoderKL, loaded from
a local directory only (nothing is downloaded). Images in [-1, 1]; latents scaled by `scale_factor`
(0.18215 for SD's VAE) so that they have about unit variance."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dpt_scale.errors import UserError


class LatentAutoencoder(nn.Module):
    def __init__(self, path: str | Path, scale_factor: float | None = None):
        super().__init__()
        from diffusers import AutoencoderKL  # imported here: only latent recipes need diffusers loaded

        path = Path(path)
        if not (path / "config.json").is_file():
            raise UserError(f"autoencoder not found: {path} must be a local diffusers AutoencoderKL directory "
                            "(config.json + weights, e.g. the 'vae' folder of Stable Diffusion); nothing is downloaded")
        self.vae = AutoencoderKL.from_pretrained(path, low_cpu_mem_usage=False, local_files_only=True).eval()
        self.vae.requires_grad_(False)
        self.scale_factor = scale_factor or self.vae.config.scaling_factor

    @torch.no_grad()
    def moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of the posterior for images in [-1, 1] (unscaled)."""
        posterior = self.vae.encode(images).latent_dist
        return posterior.mean, posterior.logvar

    def sample(self, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """A scaled latent drawn from stored moments (training re-draws one every time it sees an image)."""
        return self.scale_factor * (mean + torch.exp(0.5 * logvar) * torch.randn_like(mean))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents / self.scale_factor).sample
