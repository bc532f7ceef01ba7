"""`msn`, Masked Siamese Networks (Assran et al. 2022), the backbone of the DPT paper: a ViT sees
`anchors` random views of each image with `mask_ratio` of their patch tokens dropped; the target
network (the EMA of the online one) sees another, whole view. Both are projected, L2-normalised
and compared with learnt prototypes; the anchors' prototype distribution (temperature
`anchor_temperature`) must match the target's sharper one (`target_temperature`), and the mean
anchor distribution is pushed towards uniform (mean-entropy maximisation, weight `me_max`). With
`sinkhorn` the targets are also balanced over the prototypes (a few Sinkhorn-Knopp iterations over
the batch, across ranks), as the reference's configurations do: without it the sharpened targets of
a small model can all fall on one prototype within a few steps and stay there. The exported
backbone is the target encoder, as in the paper."""
from __future__ import annotations

import torch
import torch.distributed as dist
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
        if cfg.sinkhorn:
            wanted = balanced(wanted)
        log_p = F.log_softmax(anchor_logits.float() / cfg.anchor_temperature, dim=1)
        matching = -(wanted * log_p).sum(1).mean()
        mean = log_p.exp().mean(0)
        negative_entropy = (mean * torch.log(mean.clamp(min=1e-12))).sum()
        return matching + cfg.me_max * negative_entropy


@torch.no_grad()
def balanced(p: torch.Tensor, iterations: int = 3) -> torch.Tensor:
    """Sinkhorn-Knopp: rescale a batch's (B, K) assignment so that every prototype gets an equal
    share of the (global) batch while each row stays a distribution."""
    world = dist.get_world_size() if dist.is_initialized() else 1

    def summed(x: torch.Tensor) -> torch.Tensor:
        if world > 1:
            dist.all_reduce(x)
        return x

    q = p / summed(p.sum())
    rows, prototypes = len(p) * world, p.shape[1]
    for _ in range(iterations):
        q = q / summed(q.sum(0, keepdim=True)) / prototypes  # each prototype: 1/K of the mass
        q = q / q.sum(1, keepdim=True) / rows  # each sample: 1/B
    return q * rows
