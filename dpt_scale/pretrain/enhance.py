"""Image enhancements whose kind a `rotation_enhance` backbone learns to tell (IE-Rot / MP-SSL,
Yamaguchi et al.): each one a batch op on float (B, C, H, W) images on the 0-255 scale."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def _blur(x: torch.Tensor) -> torch.Tensor:
    """A 3x3 binomial blur, channel by channel, edges repeated."""
    kernel = torch.tensor([1.0, 2.0, 1.0], device=x.device, dtype=x.dtype)
    kernel = (kernel[:, None] * kernel[None, :] / 16).expand(x.shape[1], 1, 3, 3)
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=x.shape[1])


def _autocontrast(x: torch.Tensor) -> torch.Tensor:
    low = x.amin(dim=(2, 3), keepdim=True)
    high = x.amax(dim=(2, 3), keepdim=True)
    return (x - low) * (255 / (high - low).clamp(min=1))


ENHANCEMENTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "none": lambda x: x,
    "blur": _blur,
    "sharpen": lambda x: (2 * x - _blur(x)).clamp(0, 255),  # unsharp mask
    "solarize": lambda x: torch.where(x >= 128, 255 - x, x),
    "posterize": lambda x: torch.floor(x / 64) * 64,  # 2 bits a channel
    "invert": lambda x: 255 - x,
    "autocontrast": _autocontrast,
}


def enhance(x: torch.Tensor, kinds: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image given one of `kinds` at random; returns the images and the index of each one's kind."""
    choice = torch.randint(0, len(kinds), (len(x),), device=x.device)
    out = x.clone()
    for k, name in enumerate(kinds):
        picked = choice == k
        if picked.any():
            out[picked] = ENHANCEMENTS[name](x[picked])
    return out, choice
