"""`supervised`: labelled images only (plus pseudo images in stage 4): the baseline every report
compares against."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dpt_scale.classification.mixture import labelled_part
from dpt_scale.recipe.schema import Classifier


class Supervised:
    uses_unlabelled = False
    frozen_backbone = False

    def __init__(self, cfg: Classifier):
        self.cfg = cfg

    def loss(self, trainer, batch: dict) -> torch.Tensor:
        images, labels = labelled_part(batch, trainer.device)
        return F.cross_entropy(trainer.engine(images).float(), labels)
