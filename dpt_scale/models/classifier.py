"""Classifiers: any timm model by name, from scratch or from a local weights file (never downloaded),
optionally with its backbone frozen so that only a new linear head trains."""
from __future__ import annotations

import difflib
from pathlib import Path

import timm
from torch import nn

from dpt_scale.errors import UserError


def build_classifier(name: str, num_classes: int, in_chans: int = 3, img_size: int | None = None,
                     pretrained: str | None = None, frozen_backbone: bool = False, **kwargs) -> nn.Module:
    """`pretrained` is a local file of timm weights for `name` (any head, any input channels: timm
    adapts both). `img_size` goes to the architectures that take one (ViTs); convnets ignore it."""
    if name not in timm.list_models():
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        raise UserError(f"unknown timm model {name!r}" + (f"; did you mean {', '.join(close)}?" if close else ""))
    if pretrained is not None and not Path(pretrained).is_file():
        raise UserError(f"pretrained weights not found: {pretrained} (a local file; nothing is downloaded)")
    args = dict(pretrained=pretrained is not None, num_classes=num_classes, in_chans=in_chans,
                pretrained_cfg_overlay=dict(file=str(pretrained)) if pretrained else None, **kwargs)
    try:
        model = timm.create_model(name, **args, **({"img_size": img_size} if img_size else {}))
    except TypeError as exc:  # a convnet: no img_size argument
        if img_size is None or "img_size" not in str(exc):
            raise
        model = timm.create_model(name, **args)
    if frozen_backbone:
        model.requires_grad_(False)
        model.get_classifier().requires_grad_(True)
    return model
