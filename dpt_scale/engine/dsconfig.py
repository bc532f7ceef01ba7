"""The DeepSpeed config, generated from a recipe's `train` section (plus a raw passthrough block)."""
from __future__ import annotations

import copy

import torch

from dpt_scale.errors import UserError
from dpt_scale.recipe.schema import Train

SCHEDULERS = {"constant": "WarmupLR", "linear": "WarmupDecayLR", "cosine": "WarmupCosineLR"}


def resolve_precision(precision: str) -> str:
    if precision == "auto":
        return "bf16" if torch.cuda.is_available() else "fp32"
    if precision == "fp16" and not torch.cuda.is_available():
        raise UserError("precision fp16 needs a GPU; use fp32 (or bf16) on CPU")
    return precision


def batch_arithmetic(cfg: Train, world_size: int) -> int:
    """Gradient accumulation steps, checking global = micro x accumulation x ranks up front."""
    micro, per_step = cfg.micro_batch, cfg.micro_batch * world_size
    if cfg.global_batch is None:
        return cfg.grad_accum or 1
    accum = cfg.grad_accum or cfg.global_batch // per_step
    if accum < 1 or micro * accum * world_size != cfg.global_batch:
        fix = (f"set train.grad_accum to {cfg.global_batch // per_step}" if cfg.global_batch % per_step == 0
               else f"choose a global_batch that is a multiple of {per_step} (micro_batch x {world_size} ranks)")
        raise UserError(f"batch sizes do not add up: global_batch {cfg.global_batch} != micro_batch {micro} x "
                        f"grad_accum {cfg.grad_accum or '?'} x {world_size} ranks; {fix}")
    return accum


def deepspeed_config(cfg: Train, world_size: int) -> dict:
    accum = batch_arithmetic(cfg, world_size)
    precision = resolve_precision(cfg.precision)
    config = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch,
        "gradient_accumulation_steps": accum,
        "train_batch_size": cfg.micro_batch * accum * world_size,
        "optimizer": {"type": "AdamW", "params": {"lr": cfg.lr, "betas": list(cfg.betas), "eps": 1e-8,
                                                  "weight_decay": cfg.weight_decay,
                                                  "torch_adam": True}},  # DeepSpeed's own Adam compiles an op
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 16},
        "steps_per_print": 2**62,  # we log ourselves
    }
    if cfg.grad_clip > 0:
        config["gradient_clipping"] = cfg.grad_clip
    if cfg.offload == "cpu":
        if cfg.zero_stage == 0:  # recipes are refused at load (recipe/rules.py); this is for Train built in code
            raise UserError("train.offload: cpu needs ZeRO stage 1, 2 or 3 (train.zero_stage)")
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    if cfg.warmup_steps or cfg.lr_schedule != "constant":
        warmup = max(1, cfg.warmup_steps)  # DeepSpeed wants a positive count
        params = {"warmup_min_lr": 0.0, "warmup_max_lr": cfg.lr, "warmup_num_steps": warmup, "warmup_type": "linear"}
        if cfg.lr_schedule == "linear":
            params["total_num_steps"] = cfg.steps
        if cfg.lr_schedule == "cosine":
            params = {"total_num_steps": cfg.steps, "warmup_num_steps": warmup, "warmup_type": "linear",
                      "cos_min_ratio": 0.0}
        config["scheduler"] = {"type": SCHEDULERS[cfg.lr_schedule], "params": params}
    return _merge(config, cfg.deepspeed)


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
