"""`msn`, Masked Siamese Networks (Assran et al. 2022), the backbone of the DPT paper: a ViT sees
`anchors` random views of each image with `mask_ratio` of their patch tokens dropped; the target
network (the EMA of the online one) sees another, whole view. Both are projected, L2-normalised
and compared with learnt prototypes; the anchors' prototype distribution (temperature
`anchor_temperature`) must match the target's sharper one (`target_temperature`), and the mean
anchor distribution is pushed towards uniform (mean-entropy maximisation, weight `me_max`), which
keeps every prototype in use. The exported backbone is the target encoder, as in the paper."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dpt_scale.pretrain.augment import Views
from dpt_scale.pretrain.net import check_vit, projector
from dpt_scale.pretrain.target import EMATarget
from dpt_scale.recipe.schema import Pretrain


class _Head(nn.Module):
    def __init__(self, dim: int, widths: list[int], prototypes: int):
        super().__init__()
        self.projector = projector(dim, widths)
        self.prototypes = nn.Parameter(torch.randn(prototypes, widths[-1]) * widths[-1] ** -0.5)

    def forward(self, features: torch.Tensor, targets: torch.Tensor | None = None, project: bool = False):
        """Normalised projections (`project`), or the cosine similarities of these features and of the
        target network's projections to the prototypes. Both go through one forward pass, so that
        the prototypes are only touched inside it (as ZeRO-3 requires); the targets' side is detached."""
        z = F.normalize(self.projector(features), dim=1)
        if project:
            return z
        prototypes = F.normalize(self.prototypes, dim=1)
        return z @ prototypes.T, targets.to(z.dtype) @ prototypes.detach().T


class MSN:
    def __init__(self, cfg: Pretrain):
        self.views, self.cfg = Views(cfg.augment), cfg.msn
        self.target: EMATarget | None = None

    def head(self, dim: int) -> nn.Module:
        return _Head(dim, self.cfg.projection, self.cfg.prototypes)

    def check(self, encoder) -> None:
        check_vit(encoder, "msn")

    def attach(self, trainer, model_fn) -> None:
        self.target = EMATarget(trainer, model_fn)

    def loss(self, trainer, batch: dict) -> torch.Tensor:
        cfg = self.cfg
        images = batch["image"].to(trainer.device, non_blocking=True).float()
        targets = self.target(self.views(images), project=True)
        anchors = torch.cat([self.views(images) for _ in range(cfg.anchors)])
        anchor_logits, target_logits = trainer.engine(anchors, mask_ratio=cfg.mask_ratio,
                                                      targets=targets.repeat(cfg.anchors, 1))
        wanted = F.softmax(target_logits.float() / cfg.target_temperature, dim=1)
        log_p = F.log_softmax(anchor_logits.float() / cfg.anchor_temperature, dim=1)
        matching = -(wanted * log_p).sum(1).mean()
        mean = log_p.exp().mean(0)
        negative_entropy = (mean * torch.log(mean.clamp(min=1e-12))).sum()
        return matching + cfg.me_max * negative_entropy
