"""The training objective: predict the noise (mean squared error), with label dropout to the null
class so that one network also learns the unconditional model for classifier-free guidance."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def noise_prediction_loss(model: nn.Module, x0: torch.Tensor, y: torch.Tensor | None, schedule,
                          label_dropout: float = 0.0, null_class: int | None = None) -> torch.Tensor:
    """Draws t, noise and the dropped labels from torch's global RNG (saved in checkpoints, so a
    resumed run draws the same)."""
    b = x0.shape[0]
    t = schedule.sample_t(b, x0.device)
    noise = torch.randn_like(x0)
    alpha, sigma = (v.view(b, *[1] * (x0.dim() - 1)).to(x0.dtype) for v in schedule.alpha_sigma(t))
    xt = alpha * x0 + sigma * noise
    if y is not None and label_dropout > 0:
        y = torch.where(torch.rand(b, device=y.device) < label_dropout, torch.full_like(y, null_class), y)
    return F.mse_loss(model(xt, schedule.model_time(t), y).float(), noise.float())
