"""An exponential moving average of the weights that works under every ZeRO stage.

Under ZeRO-3 each rank holds only its partition of every parameter (`param.ds_tensor`: a contiguous
chunk of the flattened parameter, rank r holding chunk r, the last one padded). So each rank keeps
the EMA of its own partition, in float32: the update is local and needs no communication. The
full EMA is rebuilt by concatenating the ranks' chunks, either with a collective during training
(`full_state_dict`) or offline from the checkpoint files (`join_shards`). Under ZeRO 0-2 the
parameters, and so the EMA, are whole and identical on every rank.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class ShardedEMA:
    def __init__(self, module: nn.Module, decay: float, warmup: bool = True):
        self.decay, self.warmup = decay, warmup
        # Trainable parameters only: frozen ones (a linear probe's backbone) equal their own average,
        # and re-averaging them would only add rounding error and memory.
        self.params = {n: p for n, p in module.named_parameters() if p.requires_grad}
        self.partitioned = any(hasattr(p, "ds_tensor") for p in self.params.values())
        self.shapes = {n: tuple(p.ds_shape) if hasattr(p, "ds_tensor") else tuple(p.shape)
                       for n, p in self.params.items()}
        self.shadow = {n: self._local(p).detach().float().clone() for n, p in self.params.items()}

    @staticmethod
    def _local(p: nn.Parameter) -> torch.Tensor:
        return p.ds_tensor if hasattr(p, "ds_tensor") else p.data

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = self.decay_at(step)
        for name, p in self.params.items():
            self.shadow[name].mul_(d).add_(self._local(p).float(), alpha=1 - d)

    @torch.no_grad()
    def start_from(self, weights: dict[str, torch.Tensor]) -> None:
        """Set the average to whole weights (e.g. a checkpoint's fp32 values, where the module holds
        them rounded to bf16); under ZeRO-3 this rank keeps its chunk of each."""
        for name, shadow in self.shadow.items():
            value = weights[name].detach().float().flatten()
            if self.partitioned:  # chunk r of the flattened tensor, the last one zero-padded
                at, n = dist.get_rank() * shadow.numel(), shadow.numel()
                value = torch.cat([value, value.new_zeros(max(at + n - len(value), 0))])[at:at + n]
            shadow.copy_(value.view_as(shadow))

    def state_dict(self) -> dict:
        return {"shadow": self.shadow, "shapes": self.shapes, "partitioned": self.partitioned}

    def load_state_dict(self, state: dict) -> None:
        if state["shapes"] != self.shapes or state["partitioned"] != self.partitioned:
            raise ValueError("the EMA in the checkpoint does not match this model or ZeRO stage")
        for name, tensor in state["shadow"].items():
            self.shadow[name].copy_(tensor)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole EMA (a collective under ZeRO-3: call it on every rank)."""
        if not self.partitioned:
            return {n: t.clone() for n, t in self.shadow.items()}
        out = {}
        for name, shard in self.shadow.items():
            parts = [torch.empty_like(shard) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, shard)
            out[name] = _join(parts, self.shapes[name])
        return out


def join_shards(states: list[dict]) -> dict[str, torch.Tensor]:
    """The whole EMA from the per-rank EMA states of a checkpoint, in rank order (no process group)."""
    first = states[0]
    if not first["partitioned"]:
        return dict(first["shadow"])
    return {name: _join([s["shadow"][name] for s in states], shape) for name, shape in first["shapes"].items()}


def _join(parts: list[torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    numel = 1
    for d in shape:
        numel *= d
    return torch.cat(parts)[:numel].view(shape).clone()
