"""Classifiers: any timm model by name, from scratch or from a local weights file (never downloaded),
optionally with its backbone frozen so that only a new linear head trains."""
from __future__ import annotations

import difflib
import logging
from contextlib import contextmanager
from pathlib import Path

import timm
import torch
from torch import nn

from dpt_scale.compat import timm_has_no_img_size, timm_shape_mismatch
from dpt_scale.errors import UserError

log = logging.getLogger(__name__)
PRETRAIN_META = "pretrain"  # the entry of a stage-0 backbone file that says how it was made


def build_classifier(name: str, num_classes: int, in_chans: int = 3, img_size: int | None = None,
                     pretrained: str | None = None, frozen_backbone: bool = False, **kwargs) -> nn.Module:
    """`pretrained` is a local file of timm weights for `name` (any head, any input channels: timm
    adapts both). `img_size` goes to the architectures that take one (ViTs); convnets ignore it."""
    check_model_name(name)
    if pretrained is not None and not Path(pretrained).is_file():
        raise UserError(f"pretrained weights not found: {pretrained} (a local file; nothing is downloaded)")
    file_keys = _weight_names(pretrained) if pretrained else set()
    if pretrained:
        _check_pretrained_as(pretrained, name, kwargs)
    args = dict(pretrained=pretrained is not None, num_classes=num_classes, in_chans=in_chans,
                pretrained_cfg_overlay=dict(file=str(pretrained)) if pretrained else None, **kwargs)
    try:
        with _quiet(logging.getLogger("timm.models._builder")):  # its key lists: _check_fit says it in one line
            model = _create(name, img_size, args)
    except RuntimeError as exc:  # load_state_dict: tensors of the same name and another shape
        shapes = timm_shape_mismatch(exc)
        if pretrained is None or shapes is None:
            raise
        problem = f"{len(shapes)} tensor(s) differ in shape (e.g. '{shapes[0]}')" if shapes else \
            str(exc).strip().splitlines()[0]
        raise _unfit(name, pretrained, problem) from None
    if pretrained:
        _check_fit(model, file_keys, name, pretrained)
    if frozen_backbone:
        model.requires_grad_(False)
        model.get_classifier().requires_grad_(True)
    return model


def check_model_name(name: str) -> None:
    if name not in timm.list_models():
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        raise UserError(f"unknown timm model {name!r}" + (f"; did you mean {', '.join(close)}?" if close else ""))


def _check_pretrained_as(path: str, name: str, kwargs: dict) -> None:
    """A stage-0 backbone names the architecture it was trained as: another one is refused."""
    meta = pretrain_meta(path)
    if meta is not None and (meta.get("model"), meta.get("kwargs") or {}) != (name, kwargs):
        made = meta.get("model") + (f" with kwargs {meta['kwargs']}" if meta.get("kwargs") else "")
        wanted = name + (f" with kwargs {kwargs}" if kwargs else "")
        raise UserError(f"pretrained weights {path} are a stage-0 backbone of {made}, not {wanted}; set "
                        "classifier.model.name (and .kwargs) to the backbone's, or pretrain this model")


def pretrain_meta(path: str | Path) -> dict | None:
    """How a stage-0 backbone was made (the "pretrain" entry of its file); None for other weights files."""
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception:  # another format, or unreadable: the weights loader says what is wrong
        return None
    meta = checkpoint.get(PRETRAIN_META) if isinstance(checkpoint, dict) else None
    return meta if isinstance(meta, dict) else None


def _create(name: str, img_size: int | None, args: dict) -> nn.Module:
    try:
        return timm.create_model(name, **args, **({"img_size": img_size} if img_size else {}))
    except TypeError as exc:  # a convnet: no img_size argument
        if img_size is None or not timm_has_no_img_size(exc):
            raise
        return timm.create_model(name, **args)


def _weight_names(path: str) -> set[str]:
    """The tensor names in a local weights file, as timm reads them (unwrapped, `module.` removed)."""
    try:
        return set(timm.models.load_state_dict(path))
    except Exception as exc:  # torch.load raises many types for a file that is not a checkpoint
        raise UserError(f"pretrained weights {path} do not load as a state_dict ({type(exc).__name__}); give a "
                        "file saved with torch.save(model.state_dict(), ...)") from None


def _check_fit(model: nn.Module, file_keys: set[str], name: str, path: str) -> None:
    """timm loads a local file non-strictly (the head is replaced), so weights of another architecture
    would load silently and leave the backbone random: every backbone tensor must come from the file.
    Tensors of the file the model has no place for are allowed (e.g. a final norm left out by kwargs)."""
    heads = model.pretrained_cfg.get("classifier") or ()
    heads = tuple(f"{h}." for h in ((heads,) if isinstance(heads, str) else heads))

    def backbone(keys) -> set[str]:
        return {k for k in keys if not k.startswith(heads) and not k.endswith("num_batches_tracked")}

    ours = backbone(model.state_dict())
    missing, unexpected = sorted(ours - file_keys), sorted(backbone(file_keys) - ours)
    if missing:
        raise _unfit(name, path, f"{len(missing)} of its {len(ours)} backbone tensors are missing from the file "
                                 f"and {len(unexpected)} of the file's are unexpected (e.g. '{missing[0]}')")
    if unexpected:
        log.warning(f"pretrained weights {path}: {len(unexpected)} tensor(s) of the file have no place in {name} "
                    f"and are left out (e.g. '{unexpected[0]}')")


@contextmanager
def _quiet(logger: logging.Logger):
    """Only errors from `logger` while inside."""
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _unfit(name: str, path: str, problem: str) -> UserError:
    return UserError(f"pretrained weights {path} do not fit timm's {name}: {problem}; give weights of this "
                     "architecture in timm's key names, or set classifier.model.name (and .kwargs) to the file's")


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
    from dpt_scale.engine.export import load_export

    payload = load_export(path, "classifier", "run `dpt-scale train-classifier` first, which makes it")
    model = ImageClassifier(**{**payload["settings"], "pretrained": None})
    state = dict(payload["weights"])
    if ema:
        state.update(payload["ema"])
    model.load_state_dict(state)
    return model.to(device).eval()


def normalisation(name: str, pretrained: str | None, in_chans: int, mean: list[float] | None = None,
                  std: list[float] | None = None) -> tuple[list[float], list[float]]:
    """Per-channel mean and std: as given, else the pretrained weights' own (those a stage-0
    backbone learnt with, or timm's for the architecture), else 0.5 and 0.5."""
    cfg = (pretrain_meta(pretrained) or timm.models.get_pretrained_cfg(name)) if pretrained else None

    def per_channel(given, default):
        found = cfg.get(default) if isinstance(cfg, dict) else getattr(cfg, default, None)
        values = list(given or found or [0.5] * in_chans)
        if len(values) != in_chans and not given:  # e.g. RGB statistics for a grayscale input
            values = [sum(values) / len(values)] * in_chans
        if len(values) != in_chans:
            raise UserError(f"classifier.model.{default} needs {in_chans} value(s), got {values}")
        return values

    return per_channel(mean, "mean"), per_channel(std, "std")
