"""Noise schedules: x_t = alpha(t) x_0 + sigma(t) noise, with alpha^2 + sigma^2 = 1 (variance preserving).

Two, in a registry:
- `sd_discrete`: Stable Diffusion's 1000 "scaled linear" betas (sqrt-linear from 0.00085 to 0.012),
  the reference U-ViT's latent ImageNet setting. t is an integer index 0..999, fed to the network as is.
- `linear_vp`: the continuous linear VP-SDE (beta(t) = 0.1 + 19.9 t, t in [1e-3, 1]) used for pixel
  models; fed to the network as 1000 t.
Both also give 1000 discrete betas and the network time of each index, for samplers that work on
discrete timesteps (diffusers' schedulers).
"""
from __future__ import annotations

import torch


class SDDiscrete:
    name = "sd_discrete"
    num_timesteps = 1000

    def __init__(self):
        self.betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, self.num_timesteps, dtype=torch.float64) ** 2
        self.alphas_cumprod = torch.cumprod(1 - self.betas, dim=0)

    def sample_t(self, batch: int, device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.randint(0, self.num_timesteps, (batch,), device=device)

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        abar = self.alphas_cumprod.to(t.device)[t.long()]
        return abar.sqrt().float(), (1 - abar).sqrt().float()

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        return t.float()

    def index_model_time(self, index: int) -> float:
        return float(index)


class LinearVP:
    name = "linear_vp"
    num_timesteps = 1000
    beta_0, beta_1, eps = 0.1, 20.0, 1e-3

    def __init__(self):
        # Discrete betas for samplers: the chain whose cumulative alphas equal this schedule's exactly
        # at t = (i + 1) / 1000 (close to DDPM's linear 1e-4..0.02, which only approximates it).
        t = torch.arange(1, self.num_timesteps + 1, dtype=torch.float64) / self.num_timesteps
        abar = self.alpha_sigma(t)[0].double() ** 2
        self.betas = 1 - abar / torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])

    def sample_t(self, batch: int, device: torch.device | str = "cpu") -> torch.Tensor:
        return self.eps + (1 - self.eps) * torch.rand(batch, device=device)

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_alpha = -0.25 * t.double() ** 2 * (self.beta_1 - self.beta_0) - 0.5 * t.double() * self.beta_0
        return log_alpha.exp().float(), (-torch.expm1(2 * log_alpha)).sqrt().float()

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        return 1000 * t.float()

    def index_model_time(self, index: int) -> float:
        return float(index + 1)


SCHEDULES = {cls.name: cls for cls in (SDDiscrete, LinearVP)}


def build_schedule(name: str):
    if name not in SCHEDULES:
        raise ValueError(f"unknown noise schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    return SCHEDULES[name]()
