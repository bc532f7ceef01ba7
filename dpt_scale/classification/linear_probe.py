"""`linear_probe` (the reference ImageNet path): a frozen pretrained backbone, its features
L2-normalised and centred, and a multinomial logistic regression with an L2 penalty on them.
Training reads features extracted once (features.py), not images."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dpt_scale.classification.mixture import labelled_part
from dpt_scale.errors import UserError
from dpt_scale.recipe.schema import Classifier


class LinearProbe:
    uses_unlabelled = False
    frozen_backbone = True

    def __init__(self, cfg: Classifier):
        if cfg.model.pretrained is None:
            raise UserError("classifier.method linear_probe needs classifier.model.pretrained: a local file of "
                            f"{cfg.model.name} weights (nothing is downloaded)")
        if cfg.train.zero_stage == 3 or (cfg.retrain.train and cfg.retrain.train.zero_stage == 3):
            raise UserError("linear_probe trains one linear layer: ZeRO-3 gains nothing there; use zero_stage 0-2")
        self.l2 = cfg.linear_probe.l2

    def loss(self, trainer, batch: dict) -> torch.Tensor:
        features, labels = labelled_part(batch, trainer.device)
        logits = trainer.engine(features, from_features=True).float()
        weight = trainer.engine.module.head.weight  # whole under ZeRO 0-2
        return F.cross_entropy(logits, labels) + 0.5 * self.l2 * weight.float().pow(2).sum()
