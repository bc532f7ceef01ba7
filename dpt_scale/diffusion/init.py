"""`diffusion.init: FILE`: stage 2 starting from a U-ViT checkpoint made elsewhere, checked against
the recipe's model before any training.

The file may hold a plain state dict in the reference U-ViT's layout (the published ImageNet-256
U-ViT-L/2 and H/2 `.pth` files, DPT's stage-2 `nnet_ema.pth`), the same under one key of a dict
(WRAPPERS; an EMA first), with or without DataParallel's `module.` prefix, or a `train-diffusion`
export of ours (its EMA, already in our layout). Its architecture is read off its tensors' shapes
and compared with the recipe's model part by part, so that a mismatch names the setting to change,
the tensor and both shapes, instead of PyTorch's list of every tensor that differs.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from dpt_scale.errors import UserError
from dpt_scale.models import build_uvit
from dpt_scale.models.uvit import UVIT_SIZES
from dpt_scale.models.uvit_reference import LABEL_EMB, POS_EMBED, from_reference

WRAPPERS = ("ema", "nnet_ema", "model_ema", "state_dict", "model", "nnet", "module")  # the first found is taken
PATCH = "patch_embed.proj.weight"
# Tensors that only some settings make, and the recipe key that makes them.
OPTIONAL = {"final_layer.weight": ("a ", "3x3 conv after unpatchify", "diffusion.model.conv"),
            "time_embed.0.weight": ("an ", "MLP time embedding", "diffusion.model.mlp_time_embed"),
            "in_blocks.0.attn.qkv.bias": ("", "qkv biases", "diffusion.model.qkv_bias")}
FIX = "give a U-ViT checkpoint saved with torch.save(nnet.state_dict(), ...) or a train-diffusion weights.pt"


def load_init(path: str | Path, model: nn.Module, settings: dict) -> dict[str, torch.Tensor]:
    """The checkpoint at `path` as a state dict for `model` (a U-ViT built with `settings`), in our
    layout; a one-line UserError when the file is missing, unreadable or of another architecture."""
    path = Path(path)
    state, reference = read_checkpoint(path)
    check_fits(state, model, settings, f"diffusion.init {path}")
    return from_reference(state) if reference else state


def check_init(recipe) -> None:
    """What `run` refuses before any stage: a file that is missing, is no U-ViT, or differs from the
    recipe's diffusion.model. The training set may not exist yet (or be about to be re-imported), so
    its classes, channels and side are taken from the file here and compared when stage 2 starts."""
    path = Path(recipe.diffusion.init)
    state, reference = read_checkpoint(path)
    state = from_reference(state) if reference else state
    cfg = recipe.diffusion.model
    settings = dict(size=cfg.size, patch_size=cfg.patch_size, conv=cfg.conv, mlp_time_embed=cfg.mlp_time_embed,
                    qkv_bias=cfg.qkv_bias, attention="math", **_data_settings(state, cfg.patch_size))
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        model = build_uvit(**settings)
    check_fits(state, model, settings, f"diffusion.init {path}")


def _data_settings(state: dict[str, torch.Tensor], patch: int) -> dict:
    """The settings that come from the training set, as the checkpoint has them (its side rounded to
    a multiple of the recipe's patch size, so that a patch-size mismatch is the difference named)."""
    if not _is_uvit(state):
        return dict(img_size=patch, in_chans=1, num_classes=0)
    _, channels, their_patch, _ = state[PATCH].shape
    conditional = LABEL_EMB in state
    side = math.isqrt(max(state[POS_EMBED].shape[1] - 1 - conditional, 1)) * their_patch
    return dict(img_size=max(patch, round(side / patch) * patch), in_chans=channels,
                num_classes=state[LABEL_EMB].shape[0] - 1 if conditional else 0)


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """(state dict, whether it is in the reference layout)."""
    if not path.is_file():
        raise UserError(f"diffusion.init not found: {path} (a local U-ViT checkpoint, e.g. the published "
                        "imagenet256_uvit_large.pth; nothing is downloaded)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain containers only
    except Exception as exc:  # torch.load raises many types for a file that is not a checkpoint
        raise UserError(f"diffusion.init {path} does not load as a state dict ({type(exc).__name__}); {FIX}") from None
    if isinstance(payload, dict) and "kind" in payload:  # an export of ours
        if payload["kind"] != "diffusion" or not _tensors(payload.get("ema")):
            raise UserError(f"diffusion.init {path} is a {payload['kind']} model export, not a U-ViT; {FIX}")
        return {**payload["weights"], **payload["ema"]}, False
    state = _tensors(payload)
    if state is None and isinstance(payload, dict):
        state = next((s for key in WRAPPERS if key in payload and (s := _tensors(payload[key]))), None)
    if state is None:
        held = f"a dict of {', '.join(map(repr, list(payload)[:4]))}" if isinstance(payload, dict) and payload \
            else f"a {type(payload).__name__}"
        raise UserError(f"diffusion.init {path} holds no state dict of tensors ({held}); {FIX}")
    if all(k.startswith("module.") for k in state):  # saved from a DataParallel / DDP wrapper
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state, True


def _tensors(value) -> dict[str, torch.Tensor] | None:
    if isinstance(value, dict) and value and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                 for k, v in value.items()):
        return value
    return None


def check_fits(state: dict[str, torch.Tensor], model: nn.Module, settings: dict, what: str) -> None:
    """Raise a UserError naming the first difference between the checkpoint's architecture and the model's."""
    theirs = {k: list(v.shape) for k, v in state.items()}
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    if theirs == ours:
        return
    problem = _uvit_difference(theirs, ours, settings) if _is_uvit(theirs) else None
    raise UserError(f"{what} does not fit the recipe's U-ViT: {problem or _key_difference(theirs, ours)}")


def _is_uvit(shapes: dict[str, list[int]]) -> bool:
    return all(k in shapes for k in (PATCH, POS_EMBED, "mid_block.norm1.weight", "in_blocks.0.norm1.weight"))


def _blocks(shapes: dict[str, list[int]]) -> int:
    return len({k.split(".")[1] for k in shapes if k.startswith("in_blocks.")})


def _uvit_difference(theirs: dict, ours: dict, settings: dict) -> str | None:
    """The architectural setting in which the checkpoint differs, worded with its tensor and the fix."""
    (width, channels, patch, _), (our_width, our_channels, our_patch, _) = theirs[PATCH], ours[PATCH]
    blocks, our_blocks = _blocks(theirs), _blocks(ours)
    if (width, blocks) != (our_width, our_blocks):
        size = next((n for n, s in UVIT_SIZES.items() if (s["embed_dim"], s["depth"]) == (width, 2 * blocks)), None)
        fix = f"set diffusion.model.size={size}" if size else "no registered U-ViT size has them"
        return (f"it is {width} wide and {2 * blocks} deep{f' (size {size})' if size else ''}, the recipe's "
                f"diffusion.model.size {settings['size']} is {our_width} wide and {2 * our_blocks} deep "
                f"({PATCH} {theirs[PATCH]} there, {ours[PATCH]} here; in_blocks.0-{blocks - 1} there, "
                f"in_blocks.0-{our_blocks - 1} here); {fix}")
    if (LABEL_EMB in theirs) != (LABEL_EMB in ours):
        return ("it is unconditional (no label_emb.weight), the recipe's model class-conditional"
                if LABEL_EMB in ours else "it is class-conditional, the recipe's model unconditional") + \
            "; give a checkpoint of a class-conditional U-ViT"
    if LABEL_EMB in ours and theirs[LABEL_EMB] != ours[LABEL_EMB]:
        return (f"{LABEL_EMB} is {theirs[LABEL_EMB]} there and {ours[LABEL_EMB]} here: {theirs[LABEL_EMB][0] - 1} "
                f"classes there and {settings['num_classes']} in the training set (rows = classes + 1, the null "
                "class of guidance); fine-tune on a training set with the checkpoint's classes")
    if patch != our_patch:
        return (f"its patch size is {patch}, diffusion.model.patch_size {our_patch} ({PATCH} {theirs[PATCH]} there, "
                f"{ours[PATCH]} here); set diffusion.model.patch_size={patch}")
    if channels != our_channels:
        return (f"it takes {channels}-channel inputs, the training set's are {our_channels}-channel ({PATCH} "
                f"{theirs[PATCH]} there, {ours[PATCH]} here); train on {channels}-channel inputs (data.channels, or "
                "diffusion.latent.autoencoder for latents)")
    if theirs[POS_EMBED] != ours[POS_EMBED]:
        extras = 1 + (LABEL_EMB in ours)
        side = math.isqrt(max(theirs[POS_EMBED][1] - extras, 0)) * patch
        return (f"{POS_EMBED} is {theirs[POS_EMBED]} there and {ours[POS_EMBED]} here: {side}x{side} inputs there, "
                f"{settings['img_size']}x{settings['img_size']} in the training set; train on {side}x{side} inputs "
                "(data.image_size; for latents, the image side / 8)")
    for key, (article, what, setting) in OPTIONAL.items():
        if (key in theirs) != (key in ours):
            has = key in theirs
            return (f"it has {article if has else 'no '}{what} ({key}), the recipe's model "
                    f"{'has not' if has else 'has'}; set {setting}={str(has).lower()}")
    return None


def _key_difference(theirs: dict, ours: dict) -> str:
    missing, unexpected = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
    if missing or unexpected:
        parts = [f"{len(missing)} of its {len(ours)} tensors are missing from the file"
                 + (f" (e.g. {', '.join(missing[:3])})" if missing else ""),
                 f"{len(unexpected)} of the file's are unexpected" + (f" (e.g. {', '.join(unexpected[:3])})"
                                                                      if unexpected else "")]
        return f"{' and '.join(parts)}; is it a U-ViT checkpoint? {FIX}"
    name = next(k for k in ours if theirs[k] != ours[k])
    return f"{name} is {theirs[name]} there and {ours[name]} here; {FIX}"
