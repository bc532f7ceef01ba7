"""Multi-head self-attention with interchangeable kernels: xformers (CUDA), PyTorch SDPA, plain math.

The backends are a registry of functions of q, k, v shaped (batch, heads, tokens, head_dim); all
compute softmax(q k^T / sqrt(head_dim)) v and agree within floating-point tolerance (tests). q, k
and v stay in the model's dtype, so bf16 activations reach the fused bf16 kernels.
"""
from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dpt_scale.errors import UserError


def _math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    return scores.softmax(dim=-1) @ v


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v)


def _xformers(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    import xformers.ops  # imported here: optional, GPU-only

    if not q.is_cuda:
        raise UserError("attention backend 'xformers' runs on CUDA only; set attention: sdpa (or auto) on CPU")
    # xformers wants (batch, tokens, heads, head_dim)
    out = xformers.ops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


BACKENDS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "math": _math, "sdpa": _sdpa, "xformers": _xformers}


def xformers_available() -> bool:
    return importlib.util.find_spec("xformers") is not None and torch.cuda.is_available()


def resolve_backend(name: str) -> str:
    """'auto' -> xformers where it can run (CUDA and installed), else sdpa; other names are checked."""
    if name == "auto":
        return "xformers" if xformers_available() else "sdpa"
    if name not in BACKENDS:
        raise UserError(f"unknown attention backend {name!r}; choose auto, {', '.join(BACKENDS)}")
    if name == "xformers" and not xformers_available():
        raise UserError("attention backend 'xformers' needs CUDA and the xformers package "
                        "(pip install -e '.[gpu]'); use attention: auto or sdpa")
    return name


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False, backend: str = "auto"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.backend = resolve_backend(backend)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = BACKENDS[self.backend](q, k, v)  # (b, heads, n, head_dim)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))
