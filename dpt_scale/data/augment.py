"""Classifier augmentations on uint8 (C, H, W) image tensors, as the loader hands them out.

weak:   random translation by up to `translate` of the side (reflect padding, then a random crop),
        plus horizontal flips where the data allow them (never for digits).
strong: weak, then timm's RandAugment and a cutout square (FixMatch's strong view).

All randomness comes from torch's and Python's global RNGs, which the loader seeds per batch, so
a resumed run repeats its augmentations exactly.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from timm.data.auto_augment import rand_augment_transform
from torchvision.transforms.v2 import functional as F

from dpt_scale.errors import UserError
from dpt_scale.recipe.schema import Augment


def weak(cfg: Augment, size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    pad = round(cfg.translate * size)
    # Reflect padding by indexing, crop and flip by slicing: written out because torchvision's v2
    # transforms cost ~100 us each on a 28 px image (dispatch), more than the model's share of a step.
    reflect = torch.tensor([*range(pad, 0, -1), *range(size), *range(size - 2, size - 2 - pad, -1)])

    def apply(image: torch.Tensor) -> torch.Tensor:
        if pad:
            dy, dx = torch.randint(0, 2 * pad + 1, (2,)).tolist()
            image = image[:, reflect[dy:dy + size]][:, :, reflect[dx:dx + size]]
        if cfg.flip and torch.rand(()) < 0.5:
            image = image.flip(-1)
        return image

    return apply


def strong(cfg: Augment, size: int, channels: int) -> Callable[[torch.Tensor], torch.Tensor]:
    base = weak(cfg, size)
    try:
        randaugment = rand_augment_transform(cfg.randaugment, {"translate_const": round(0.45 * size),
                                                               "img_mean": (128,) * channels})
    except Exception as exc:  # timm raises assorted errors for a malformed config string
        raise UserError(f"classifier.augment.randaugment {cfg.randaugment!r} is not a timm RandAugment "
                        f"config ({exc}); e.g. rand-m10-n2-mstd0.5") from None
    side = round(cfg.cutout * size)

    def apply(image: torch.Tensor) -> torch.Tensor:
        image = F.pil_to_tensor(randaugment(F.to_pil_image(base(image))))
        if side:  # cutout: a grey square centred anywhere in the image, clipped at the borders
            y, x = (torch.randint(0, size, (2,)) - side // 2).clamp(min=0).tolist()
            image[:, y:y + side, x:x + side] = 127
        return image

    return apply


def weak_and_strong(cfg: Augment, size: int, channels: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Both views of one image, stacked (2, C, H, W): FixMatch's unlabelled input."""
    w, s = weak(cfg, size), strong(cfg, size, channels)
    return lambda image: torch.stack([w(image), s(image)])
