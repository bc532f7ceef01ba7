"""Classifiers: any timm model by name, from scratch or from a local weights file (never downloaded),
optionally with its backbone frozen so that only a new linear head trains."""
from __future__ import annotations

import difflib
from pathlib import Path

import timm
import torch
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


class ImageClassifier(nn.Module):
    """Images as the loader gives them (uint8, 0-255) in, logits out. Resizing and normalisation
    live in the model so that training, pseudo-labelling and evaluation all feed it raw batches.

    `frozen_backbone` is the linear-probe form: features from the frozen backbone are L2-normalised
    and centred (by `feature_mean`, the labelled features' mean) before a linear layer."""

    def __init__(self, name: str, num_classes: int, in_chans: int, img_size: int, mean: list[float],
                 std: list[float], pretrained: str | None = None, frozen_backbone: bool = False,
                 input_size: int | None = None, crop_pct: float | None = None, model_kwargs: dict | None = None):
        super().__init__()
        self.input_size, self.frozen = input_size, frozen_backbone
        self.crop = round(img_size * crop_pct) if crop_pct else None  # centre crop, before the resize
        size = input_size or self.crop or img_size
        model_kwargs = model_kwargs or {}
        if frozen_backbone:
            self.net = build_classifier(name, 0, in_chans, size, pretrained, frozen_backbone=False, **model_kwargs)
            self.net.requires_grad_(False)
            self.head = nn.Linear(self.net.num_features, num_classes)
            self.register_buffer("feature_mean", torch.zeros(self.net.num_features))
        else:
            self.net = build_classifier(name, num_classes, in_chans, size, pretrained, **model_kwargs)
            self.head = None
        self.register_buffer("mean", 255 * torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", 255 * torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised, uncentred backbone features (linear-probe form only)."""
        return nn.functional.normalize(self.net(self.prepare(images)).float(), dim=1)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.to(self.mean.dtype) - self.mean) / self.std
        if self.crop and x.shape[-1] != self.crop:
            top, left = (x.shape[-2] - self.crop) // 2, (x.shape[-1] - self.crop) // 2
            x = x[..., top:top + self.crop, left:left + self.crop]
        if self.input_size and x.shape[-1] != self.input_size:
            x = nn.functional.interpolate(x, size=(self.input_size,) * 2, mode="bilinear", antialias=True,
                                          align_corners=False)
        return x.to(next(self.parameters()).dtype)

    def forward(self, x: torch.Tensor, from_features: bool = False) -> torch.Tensor:
        """Logits of images, or (linear probe) of features already taken by `features`."""
        if self.head is None:
            return self.net(self.prepare(x))
        features = x if from_features else self.features(x)
        return self.head(features.to(self.head.weight.dtype) - self.feature_mean.to(self.head.weight.dtype))


def load_classifier(path: str | Path, ema: bool = True, device: str | torch.device = "cpu") -> ImageClassifier:
    """A classifier exported by train-classifier or retrain (`weights.pt`), with its EMA weights
    by default (BatchNorm statistics come from the trained model, as the EMA keeps parameters)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"classifier weights not found: {path} (run `dpt-scale train-classifier` first)")
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if payload.get("kind") != "classifier":
        raise UserError(f"{path} is not a classifier export (it holds a {payload.get('kind', 'diffusion')} model)")
    model = ImageClassifier(**{**payload["settings"], "pretrained": None})
    state = dict(payload["weights"])
    if ema:
        state.update(payload["ema"])
    model.load_state_dict(state)
    return model.to(device).eval()


def normalisation(name: str, pretrained: str | None, in_chans: int, mean: list[float] | None = None,
                  std: list[float] | None = None) -> tuple[list[float], list[float]]:
    """Per-channel mean and std: as given, else the pretrained weights' own, else 0.5 and 0.5."""
    cfg = timm.models.get_pretrained_cfg(name) if pretrained else None

    def per_channel(given, default):
        values = list(given or (getattr(cfg, default, None) if cfg else None) or [0.5] * in_chans)
        if len(values) != in_chans and not given:  # e.g. RGB statistics for a grayscale input
            values = [sum(values) / len(values)] * in_chans
        if len(values) != in_chans:
            raise UserError(f"classifier.model.{default} needs {in_chans} value(s), got {values}")
        return values

    return per_channel(mean, "mean"), per_channel(std, "std")
