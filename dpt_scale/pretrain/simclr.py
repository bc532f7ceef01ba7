"""`simclr` (Chen et al. 2020): two random views of each image, projected and L2-normalised; each
view's partner must be the most similar of the other 2B - 1 views (NT-Xent, temperature t).
Negatives are the rank's own micro-batch."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dpt_scale.pretrain.augment import Views
from dpt_scale.pretrain.net import projector
from dpt_scale.recipe.schema import Pretrain


class SimCLR:
    def __init__(self, cfg: Pretrain):
        self.views, self.cfg = Views(cfg.augment), cfg.simclr

    def head(self, dim: int) -> nn.Module:
        return projector(dim, self.cfg.projection)

    def check(self, encoder) -> None:
        pass

    def loss(self, trainer, batch: dict) -> torch.Tensor:
        images = batch["image"].to(trainer.device, non_blocking=True).float()
        n = len(images)
        z = F.normalize(trainer.engine(torch.cat([self.views(images), self.views(images)])).float(), dim=1)
        similarity = z @ z.T / self.cfg.temperature
        similarity.fill_diagonal_(float("-inf"))  # a view is not its own partner
        partner = (torch.arange(2 * n, device=z.device) + n) % (2 * n)
        return F.cross_entropy(similarity, partner)
