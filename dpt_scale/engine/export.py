"""Export a checkpoint as one file a plain model loads, no DeepSpeed or process group needed:
{"weights": float32 weights, "ema": EMA weights, "step": ..., **extra} (extra: e.g. "settings", the
model's constructor arguments).

The float32 weights come from DeepSpeed's own conversion of the ZeRO partitions
(zero_to_fp32); the EMA from joining the ranks' EMA chunks."""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
from pathlib import Path

import torch

from dpt_scale.engine.checkpoint import COMPLETE, rank_file, saving, tag_of
from dpt_scale.engine.ema import join_shards
from dpt_scale.errors import UserError


def export_weights(root: str | Path, step: int, out: str | Path, extra: dict | None = None) -> Path:
    root, out = Path(root), Path(out)
    tag_dir = root / tag_of(step)
    if not (tag_dir / COMPLETE).is_file():
        raise UserError(f"{tag_dir} is not a complete checkpoint")
    meta = json.loads((tag_dir / COMPLETE).read_text())
    if meta["zero_stage"] == 0:  # zero_to_fp32 handles ZeRO 1-3; stage 0 keeps whole weights in one file
        module = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
        model = {k: v.float() for k, v in module.items()}
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # chatty
            model = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag_of(step))
    ranks = [torch.load(rank_file(root, step, r), map_location="cpu", weights_only=False)
             for r in range(meta["world_size"])]
    return write_export(model, join_shards([r["ema"] for r in ranks]), step, out, extra)


def write_export(weights: dict, ema: dict, step: int, out: str | Path, extra: dict | None = None) -> Path:
    """The export file itself, written to a temporary name and renamed."""
    out = Path(out)
    payload = {"weights": weights, "ema": ema, "step": step}
    clash = set(payload) & set(extra or {})
    if clash:
        raise ValueError(f"export: extra keys {sorted(clash)} would overwrite the weights")
    payload.update(extra or {})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with saving(out):
        torch.save(payload, tmp)
    os.replace(tmp, out)
    return out


def weights_identity(path: str | Path) -> str:
    """A short checksum naming an exported weights file, recorded by whatever is derived from it."""
    with open(path, "rb") as f:
        return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()[:16]


def load_export(path: str | Path, kind: str, fix: str) -> dict:
    """An exported weights file of `kind` ("classifier", "diffusion"), as a dict; a missing file, one
    that is not a checkpoint or one of another model is a one-line error ending with `fix`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{kind} weights not found: {path} ({fix})")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch.load raises many types for a file that is not a checkpoint
        raise UserError(f"{path} is not a readable weights file ({type(exc).__name__}); {fix}") from None
    found = payload.get("kind") if isinstance(payload, dict) else None
    if found != kind:
        what = f"a {found} model" if found else "something else"
        raise UserError(f"{path} is not a {kind} model export (it holds {what}); {fix}")
    return payload
