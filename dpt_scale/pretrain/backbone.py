"""The stage-0 backbone on disk, and where a recipe finds it.

`<pretrain.out>/backbone.pt` is a plain timm checkpoint, {"state_dict": the backbone's weights
(the EMA: for MSN the target encoder), "pretrain": how it was made}, which
`classifier.model.pretrained` loads exactly as it loads a downloaded MSN or timm file. The
"pretrain" entry names the architecture (so that weights of another model are refused in one
line) and the pixel normalisation the backbone learnt with (which stage 1 must repeat).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from dpt_scale.errors import UserError
from dpt_scale.layout import layout
from dpt_scale.models.classifier import PRETRAIN_META
from dpt_scale.recipe import Recipe

PRETRAIN = "pretrain"  # the value of classifier.model.pretrained that names this run's stage-0 backbone
BACKBONE = "backbone.pt"
ENCODER = "encoder.net."  # the backbone's place in PretrainNet


def uses_pretrain(recipe: Recipe) -> bool:
    return recipe.classifier.model.pretrained == PRETRAIN


def pretrain_dir(recipe: Recipe) -> Path:
    return Path(recipe.pretrain.out or layout(recipe).pretrain)


def pretrain_seed(recipe: Recipe) -> int:
    return recipe.seed if recipe.pretrain.seed is None else recipe.pretrain.seed


def pretrained_file(recipe: Recipe) -> str | None:
    """The weights file classifier.model.pretrained means (None: no pretrained backbone)."""
    if not uses_pretrain(recipe):
        return recipe.classifier.model.pretrained
    path = pretrain_dir(recipe) / BACKBONE
    if not path.is_file():
        raise UserError(f"classifier.model.pretrained is `{PRETRAIN}`, but there is no stage-0 backbone at {path}; "
                        "run `dpt-scale pretrain RECIPE` first (`dpt-scale run` does)")
    return str(path)


def write_backbone(export: Path, out: Path, meta: dict) -> Path:
    """The backbone's EMA weights (and the online model's buffers, e.g. BatchNorm statistics) of a
    trainer export, as a timm checkpoint."""
    payload = torch.load(export, map_location="cpu", weights_only=False)
    state = {**payload["weights"], **payload["ema"]}
    weights = {k.removeprefix(ENCODER): v for k, v in state.items() if k.startswith(ENCODER)}
    tmp = out.with_name(out.name + ".tmp")
    torch.save({"state_dict": weights, PRETRAIN_META: meta}, tmp)
    os.replace(tmp, out)
    return out
