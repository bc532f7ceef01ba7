"""Sampling loops from diffusers' schedulers, with classifier-free guidance in the usual convention:
eps = eps_null + w (eps_class - eps_null); w = 1 is no guidance, w = 1.4 is the paper's setting
(U-ViT's "scale 0.4").

Two solvers, in a registry: `dpm_solver++` (multistep, second order: the sampler DPT uses, 10-50
steps) and `ddpm` (ancestral sampling, hundreds of steps: the slow baseline it is compared with).
Ancestral steps draw fresh noise; it comes from per-image generators, so that an image never
depends on which other images share its batch.
"""
from __future__ import annotations

import torch
from torch import nn


def dpm_solver(schedule, steps: int, prediction: str):
    from diffusers import DPMSolverMultistepScheduler  # imported here: sampling only

    scheduler = DPMSolverMultistepScheduler(num_train_timesteps=schedule.num_timesteps,
                                            trained_betas=schedule.betas.tolist(), algorithm_type="dpmsolver++",
                                            solver_order=2, prediction_type=prediction, lower_order_final=True)
    scheduler.set_timesteps(steps)
    return scheduler


def ddpm(schedule, steps: int, prediction: str):
    from diffusers import DDPMScheduler

    # No clipping of the predicted x0: latents are not bounded, and the DPM-Solver++ path does not clip.
    scheduler = DDPMScheduler(num_train_timesteps=schedule.num_timesteps, trained_betas=schedule.betas.tolist(),
                              prediction_type=prediction, clip_sample=False)
    scheduler.set_timesteps(steps)
    return scheduler


SOLVERS = {"dpm_solver++": dpm_solver, "ddpm": ddpm}


@torch.no_grad()
def sample(model: nn.Module, schedule, labels: torch.Tensor, shape: tuple[int, ...], steps: int = 25,
           guidance: float = 1.0, null_class: int | None = None, noise: torch.Tensor | None = None,
           solver: str = "dpm_solver++", generators: list[torch.Generator] | None = None,
           prediction: str = "epsilon") -> torch.Tensor:
    """Samples in the model's space (pixels in [-1, 1], or scaled latents), one per label.
    `generators` (one per image) feed the ancestral solver's noise; `noise` is the starting point;
    `prediction` is what the model was trained to output (diffusion/loss.py). Guidance mixes the
    conditional and unconditional outputs linearly, which is the same for either target."""
    device = labels.device
    dtype = next(model.parameters()).dtype
    scheduler = SOLVERS[solver](schedule, steps, prediction)
    x = (noise if noise is not None else torch.randn(len(labels), *shape, device=device)) * scheduler.init_noise_sigma
    null = torch.full_like(labels, null_class if null_class is not None else -1)
    for index in scheduler.timesteps:
        t = torch.full((len(labels),), schedule.index_model_time(int(index)), device=device)
        if guidance == 1.0:
            out = model(x.to(dtype), t, labels).float()
        else:
            both = model(torch.cat([x, x]).to(dtype), torch.cat([t, t]), torch.cat([labels, null])).float()
            conditional, unconditional = both.chunk(2)
            out = unconditional + guidance * (conditional - unconditional)
        x = scheduler.step(out, index, x, **({"generator": generators} if solver == "ddpm" else {})).prev_sample
    return x


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] -> uint8 0..255 (rounded, clipped), on the same device."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
