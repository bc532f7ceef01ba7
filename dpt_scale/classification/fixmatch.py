"""`fixmatch` (Sohn et al. 2020): cross-entropy on the labelled images, plus, for each unlabelled
image whose weakly augmented view the model classifies with confidence >= threshold, cross-entropy
of its strongly augmented view against that prediction."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dpt_scale.classification.mixture import labelled_part
from dpt_scale.recipe.schema import Classifier


class FixMatch:
    uses_unlabelled = True
    frozen_backbone = False

    def __init__(self, cfg: Classifier):
        self.cfg = cfg.fixmatch

    def loss(self, trainer, batch: dict) -> torch.Tensor:
        images, labels = labelled_part(batch, trainer.device)
        views = batch["unlabelled"]["image"].to(trainer.device, non_blocking=True)  # (U, 2, C, H, W)
        # One forward pass over all three groups, so that BatchNorm sees them together (as in the paper).
        logits = trainer.engine(torch.cat([images, views[:, 0], views[:, 1]])).float()
        supervised, weak, strong = logits.split([len(images), len(views), len(views)])
        confidence, target = weak.detach().softmax(1).max(1)
        mask = (confidence >= self.cfg.threshold).float()
        unsupervised = (F.cross_entropy(strong, target, reduction="none") * mask).mean()
        return F.cross_entropy(supervised, labels) + self.cfg.unlabelled_weight * unsupervised
