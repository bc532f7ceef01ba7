"""Random views for self-supervised pretraining, drawn for a whole batch at once on its device.

A view is a random affine warp (zoom, rotation, shear, translation, flip: one `grid_sample` for the
batch), then colour jitter, grayscale and a cutout square, each per image. Written as batch tensor
ops rather than per-image torchvision transforms, which cost ~100 us each on a small image, more
than the model's share of a step on a CPU. Randomness comes from torch's global RNG, which the
trainer checkpoints, so a resumed run draws the same views.

Images are float (B, C, H, W) on the 0-255 scale, as the loader's uint8 batches become.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dpt_scale.recipe.schema import PretrainAugment

GRAY = torch.tensor([0.299, 0.587, 0.114])  # ITU-R 601 luma


class Views:
    def __init__(self, cfg: PretrainAugment):
        self.cfg = cfg

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = self._warp(images)
        x = self._colour(x)
        return self._erase(x)

    def _uniform(self, n: int, low: float, high: float, device) -> torch.Tensor:
        return torch.empty(n, device=device).uniform_(low, high)

    def _warp(self, x: torch.Tensor) -> torch.Tensor:
        cfg, n, device = self.cfg, len(x), x.device
        zoom = self._uniform(n, *cfg.zoom, device)
        angle = self._uniform(n, -cfg.rotate, cfg.rotate, device) * (math.pi / 180)
        shear = torch.tan(self._uniform(n, -cfg.shear, cfg.shear, device) * (math.pi / 180))
        shift = torch.empty(n, 2, device=device).uniform_(-cfg.translate, cfg.translate) * 2  # [-1, 1] spans the side
        flip = torch.where(torch.rand(n, device=device) < 0.5, -1.0, 1.0) if cfg.flip else torch.ones(n, device=device)
        cos, sin = torch.cos(angle), torch.sin(angle)
        # output pixel p samples the input at rotation x shear x (p / zoom) + shift, x mirrored when flipped
        theta = torch.zeros(n, 2, 3, device=device)
        theta[:, 0, 0] = cos * flip / zoom
        theta[:, 0, 1] = (cos * shear - sin) / zoom
        theta[:, 1, 0] = sin * flip / zoom
        theta[:, 1, 1] = (sin * shear + cos) / zoom
        theta[:, :, 2] = shift
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def _colour(self, x: torch.Tensor) -> torch.Tensor:
        cfg, n = self.cfg, len(x)
        if cfg.color:
            shape = (n, 1, 1, 1)
            brightness = self._uniform(n, 1 - cfg.color, 1 + cfg.color, x.device).view(shape)
            contrast = self._uniform(n, 1 - cfg.color, 1 + cfg.color, x.device).view(shape)
            x = x * brightness
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            x = (x - mean) * contrast + mean
            if x.shape[1] == 3:
                saturation = self._uniform(n, 1 - cfg.color, 1 + cfg.color, x.device).view(shape)
                gray = _gray(x)
                x = (x - gray) * saturation + gray
            x = x.clamp(0, 255)
        if cfg.grayscale and x.shape[1] == 3:
            x = torch.where((torch.rand(n, device=x.device) < cfg.grayscale).view(n, 1, 1, 1), _gray(x).expand_as(x), x)
        return x

    def _erase(self, x: torch.Tensor) -> torch.Tensor:
        cfg, (n, _, h, w) = self.cfg, x.shape
        if not cfg.erase or not cfg.erase_size:
            return x
        side_h, side_w = max(1, round(cfg.erase_size * h)), max(1, round(cfg.erase_size * w))
        top = (torch.rand(n, device=x.device) * (h - side_h + 1)).long().view(n, 1, 1)
        left = (torch.rand(n, device=x.device) * (w - side_w + 1)).long().view(n, 1, 1)
        on = (torch.rand(n, device=x.device) < cfg.erase).view(n, 1, 1)
        rows = torch.arange(h, device=x.device).view(1, h, 1)
        cols = torch.arange(w, device=x.device).view(1, 1, w)
        square = on & (rows >= top) & (rows < top + side_h) & (cols >= left) & (cols < left + side_w)
        fill = x.mean(dim=(2, 3), keepdim=True)  # each image's own mean colour: neither black nor white
        return torch.where(square[:, None], fill, x)


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (x * GRAY.to(x).view(1, 3, 1, 1)).sum(1, keepdim=True)


def rotations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image turned by 0, 90, 180 and 270 degrees (4B images, square ones) and the turn of each."""
    turned = torch.cat([torch.rot90(x, k, dims=(2, 3)) for k in range(4)])
    return turned, torch.arange(4, device=x.device).repeat_interleave(len(x))
