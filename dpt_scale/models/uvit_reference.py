"""Checkpoints of the reference U-ViT (github.com/baofff/U-ViT, libs/uvit.py) and of ours.

The two networks have the same tensors under the same names and shapes (the published ImageNet
U-ViT-L/2 and H/2 `.pth` files, plain state dicts of the EMA network, and DPT's stage-2 checkpoints
load into ours with strict=True), but not the same token order: the reference prepends the class
token before the time token, [class, time, patches], and we run [time, class, patches]. Nothing
in a transformer block depends on where a token sits except through the position embedding, and
the output reads only the patch tokens, so swapping rows 0 and 1 of `pos_embed` makes the loaded
network compute what the reference computes (to float rounding). Loaded name for name without the
swap, it is a slightly different network. The swap is its own inverse; an unconditional model has
a single extra token (time) and nothing to swap.
"""
from __future__ import annotations

import torch

POS_EMBED = "pos_embed"
LABEL_EMB = "label_emb.weight"


def _swap_extra_tokens(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if LABEL_EMB not in state:
        return dict(state)
    pos = state[POS_EMBED].clone()
    pos[:, [0, 1]] = pos[:, [1, 0]]
    return {**state, POS_EMBED: pos}


def from_reference(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A reference U-ViT state dict in our layout (a new dict; the input is left as it was)."""
    return _swap_extra_tokens(state)


def to_reference(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our U-ViT state dict in the reference's layout, e.g. for its sampling scripts."""
    return _swap_extra_tokens(state)
