"""The training objective: mean squared error on the network's target, with label dropout to the
null class so that one network also learns the unconditional model for classifier-free guidance.

Targets (`prediction`): `epsilon`, the noise (the paper's); or `v_prediction`, v = alpha noise -
sigma x0 (Salimans & Ho). Both carry the same information; they differ in where errors land. An
epsilon error at high noise is amplified sigma/alpha times in the implied image, so an epsilon
model must learn a near-identity map very precisely before its samples form shapes; with v the
network predicts the image itself there. Short runs (the CPU demo) train usable models with v.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PREDICTIONS = ("epsilon", "v_prediction")  # diffusers' names for the same choices


def denoising_loss(model: nn.Module, x0: torch.Tensor, y: torch.Tensor | None, schedule,
                   label_dropout: float = 0.0, null_class: int | None = None,
                   prediction: str = "epsilon") -> torch.Tensor:
    """Draws t, noise and the dropped labels from torch's global RNG (saved in checkpoints, so a
    resumed run draws the same)."""
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; choose one of {', '.join(PREDICTIONS)}")
    b = x0.shape[0]
    t = schedule.sample_t(b, x0.device)
    noise = torch.randn_like(x0)
    alpha, sigma = (v.view(b, *[1] * (x0.dim() - 1)).to(x0.dtype) for v in schedule.alpha_sigma(t))
    xt = alpha * x0 + sigma * noise
    if y is not None and label_dropout > 0:
        y = torch.where(torch.rand(b, device=y.device) < label_dropout, torch.full_like(y, null_class), y)
    target = noise if prediction == "epsilon" else alpha * noise - sigma * x0
    return F.mse_loss(model(xt, schedule.model_time(t), y).float(), target.float())
