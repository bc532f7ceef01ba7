"""The target network of a self-distillation method (MSN's): a copy of the online network whose
weights are the trainer's EMA. Being the EMA, it is checkpointed, resumed and exported with it, and
it works under every ZeRO stage: under ZeRO 0-2 its parameters are the EMA's own tensors (no copy
per step); under ZeRO-3, where each rank holds a slice of the EMA, they are joined before each use."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class EMATarget:
    def __init__(self, trainer, model_fn: Callable[[], nn.Module]):
        with torch.random.fork_rng(devices=[]):  # building it must not move the training RNG
            self.model = model_fn().to(trainer.device)
        self.model.requires_grad_(False)
        self.ema = trainer.ema
        if not self.ema.partitioned:
            params = dict(self.model.named_parameters())
            for name, shadow in self.ema.shadow.items():
                params[name].data = shadow  # updated in place by every EMA step and by a resume

    @torch.no_grad()
    def __call__(self, *args, **kwargs):
        if self.ema.partitioned:  # a collective: every rank calls the target together
            self.model.load_state_dict(self.ema.full_state_dict(), strict=False)
        return self.model(*args, **kwargs)
