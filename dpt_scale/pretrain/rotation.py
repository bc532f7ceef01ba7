"""`rotation`: predict which of 0/90/180/270 degrees an image was turned by (Gidaris et al. 2018;
the self-supervision S3GAN adds to its discriminator). `rotation_enhance` (IE-Rot / MP-SSL,
Yamaguchi et al.) also predicts which image enhancement each image got, with a second head.

Every image of the batch is shown in all four turns, after a random view (pretrain.augment)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dpt_scale.errors import UserError
from dpt_scale.pretrain.augment import Views, rotations
from dpt_scale.pretrain.enhance import ENHANCEMENTS, enhance
from dpt_scale.recipe.schema import Pretrain


class Rotation:
    def __init__(self, cfg: Pretrain):
        self.views = Views(cfg.augment)

    def head(self, dim: int) -> nn.Module:
        return nn.Linear(dim, 4)

    def check(self, encoder) -> None:
        pass

    def loss(self, trainer, batch: dict) -> torch.Tensor:
        images = self.views(batch["image"].to(trainer.device, non_blocking=True).float())
        turned, turns = rotations(images)
        return F.cross_entropy(trainer.engine(turned).float(), turns)


class _TwoHeads(nn.Module):
    def __init__(self, dim: int, enhancements: int):
        super().__init__()
        self.rotation, self.enhancement = nn.Linear(dim, 4), nn.Linear(dim, enhancements)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rotation(features), self.enhancement(features)


class RotationEnhance(Rotation):
    def __init__(self, cfg: Pretrain):
        super().__init__(cfg)
        self.kinds = cfg.rotation_enhance.enhancements
        unknown = [k for k in self.kinds if k not in ENHANCEMENTS]
        if unknown or len(self.kinds) < 2 or len(set(self.kinds)) < len(self.kinds):
            problem = f"unknown {unknown[0]!r}" if unknown else "fewer than two distinct kinds"
            raise UserError(f"pretrain.rotation_enhance.enhancements {self.kinds}: {problem}; choose two or more of "
                            f"{', '.join(ENHANCEMENTS)}")

    def head(self, dim: int) -> nn.Module:
        return _TwoHeads(dim, len(self.kinds))

    def loss(self, trainer, batch: dict) -> torch.Tensor:
        images = self.views(batch["image"].to(trainer.device, non_blocking=True).float())
        images, kinds = enhance(images, self.kinds)
        turned, turns = rotations(images)
        rotation, enhancement = trainer.engine(turned)
        return F.cross_entropy(rotation.float(), turns) + F.cross_entropy(enhancement.float(), kinds.repeat(4))
