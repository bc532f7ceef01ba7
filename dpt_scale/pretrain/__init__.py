"""Stage-0 self-supervised methods, by recipe name (`pretrain.method`).

A method gives the head its network trains (`head(dim)`), checks that the backbone suits it
(`check(encoder)`) and computes the loss of a batch of unlabelled images (`loss(trainer, batch)`);
one with a target network also has `attach(trainer, model_fn)`."""
from __future__ import annotations

from dpt_scale.errors import UserError
from dpt_scale.pretrain.msn import MSN
from dpt_scale.pretrain.rotation import Rotation, RotationEnhance
from dpt_scale.pretrain.simclr import SimCLR
from dpt_scale.recipe.schema import Pretrain

METHODS = {"rotation": Rotation, "rotation_enhance": RotationEnhance, "simclr": SimCLR, "msn": MSN}


def build_method(cfg: Pretrain):
    if cfg.method not in METHODS:
        raise UserError(f"unknown pretrain.method {cfg.method!r}; choose one of {', '.join(METHODS)}")
    return METHODS[cfg.method](cfg)


__all__ = ["METHODS", "build_method"]
