"""U-ViT (Bao et al., "All are Worth Words: A ViT Backbone for Diffusion Models"): a class-conditional
noise-prediction network for images or autoencoder latents.

Everything is a token: the diffusion time, the class (one extra "null" class, index `num_classes`,
for classifier-free guidance) and the image patches, with a learned position embedding. The blocks
form a U: depth/2 blocks whose outputs are kept, a middle block, then depth/2 blocks that each
first merge one kept output (concatenate, Linear 2D -> D), last in first out. The patch tokens are
projected back to patches, reassembled, and optionally smoothed by a 3x3 convolution.

Sizes (width / depth / heads; depth counts the in and out blocks, the middle one comes on top)
follow the paper; at 4x32x32 latents with patch 2 they have 44M / 131M / 287M / 501M parameters
(a test checks this). The model knows nothing about distribution.
"""
from __future__ import annotations

import math

import torch
from einops import rearrange
from timm.layers import Mlp, PatchEmbed, trunc_normal_
from torch import nn
from torch.utils.checkpoint import checkpoint

from dpt_scale.models.attention import Attention

UVIT_SIZES: dict[str, dict] = {
    "tiny": dict(embed_dim=64, depth=4, num_heads=4),  # CPU tests
    "mini": dict(embed_dim=128, depth=6, num_heads=4),  # the embedded MNIST on a CPU (1.5M at patch 4)
    "S": dict(embed_dim=512, depth=12, num_heads=8),
    "M": dict(embed_dim=768, depth=16, num_heads=12),
    "L": dict(embed_dim=1024, depth=20, num_heads=16),
    "H": dict(embed_dim=1152, depth=28, num_heads=16),
}


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal features of (possibly fractional) timesteps, (batch,) -> (batch, dim), in float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1) if dim % 2 else emb


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, attention: str, skip: bool):
        super().__init__()
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, backend=attention)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class UViT(nn.Module):
    def __init__(self, img_size: int = 32, patch_size: int = 2, in_chans: int = 4, embed_dim: int = 512,
                 depth: int = 12, num_heads: int = 8, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 num_classes: int = 0, conv: bool = True, mlp_time_embed: bool = False,
                 attention: str = "auto", grad_checkpointing: bool = False):
        super().__init__()
        if depth % 2:
            raise ValueError(f"depth {depth} must be even: depth/2 blocks go down, depth/2 come up")
        self.in_chans, self.patch_size, self.num_classes = in_chans, patch_size, num_classes
        self.embed_dim, self.depth, self.grad_checkpointing = embed_dim, depth, grad_checkpointing
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.num_patches = self.patch_embed.num_patches
        self.time_embed = nn.Sequential(nn.Linear(embed_dim, 4 * embed_dim), nn.SiLU(),
                                        nn.Linear(4 * embed_dim, embed_dim)) if mlp_time_embed else nn.Identity()
        self.label_emb = nn.Embedding(num_classes + 1, embed_dim) if num_classes > 0 else None
        self.extras = 1 + (num_classes > 0)  # time token, class token
        self.pos_embed = nn.Parameter(torch.zeros(1, self.extras + self.num_patches, embed_dim))
        block = dict(dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, attention=attention)
        self.in_blocks = nn.ModuleList([Block(**block, skip=False) for _ in range(depth // 2)])
        self.mid_block = Block(**block, skip=False)
        self.out_blocks = nn.ModuleList([Block(**block, skip=True) for _ in range(depth // 2)])
        self.norm = nn.LayerNorm(embed_dim)
        self.decoder_pred = nn.Linear(embed_dim, patch_size ** 2 * in_chans)
        self.final_layer = nn.Conv2d(in_chans, in_chans, 3, padding=1) if conv else nn.Identity()
        trunc_normal_(self.pos_embed, std=0.02)
        self.apply(_init_weights)

    @property
    def null_class(self) -> int:
        """The label that means "no class" (classifier-free guidance)."""
        return self.num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Predicted noise for images or latents x (B, C, H, W) at timesteps t (B,), classes y (B,)."""
        tokens = self.patch_embed(x)
        extras = [self.time_embed(timestep_embedding(t, self.embed_dim).to(tokens.dtype))]
        if self.label_emb is not None:
            if y is None:
                raise ValueError("a class-conditional U-ViT needs labels y (use null_class for none)")
            extras.append(self.label_emb(y))
        x = torch.cat([e.unsqueeze(1) for e in extras] + [tokens], dim=1) + self.pos_embed
        kept = []
        for block in self.in_blocks:
            x = self._run(block, x)
            kept.append(x)
        x = self._run(self.mid_block, x)
        for block in self.out_blocks:
            x = self._run(block, x, kept.pop())
        x = self.decoder_pred(self.norm(x))[:, self.extras:]
        return self.final_layer(self._unpatchify(x))

    def _run(self, block: Block, *args: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def _unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.patch_embed.grid_size
        p = self.patch_size
        return rearrange(x, "b (h w) (p1 p2 c) -> b c (h p1) (w p2)", h=h, p1=p, p2=p)

    def flops_per_image(self) -> float:
        """Forward FLOPs for one image (a multiply-add counts 2); training costs about 3x this
        (4x with gradient checkpointing, which recomputes the forward pass)."""
        d, n = self.embed_dim, self.extras + self.num_patches
        hidden = self.in_blocks[0].mlp.fc1.out_features if self.in_blocks else 4 * d
        block = 2 * n * d * 3 * d + 2 * 2 * n * n * d + 2 * n * d * d + 2 * 2 * n * d * hidden
        skips = (self.depth // 2) * 2 * n * 2 * d * d
        p2c = self.patch_size ** 2 * self.in_chans
        patches = 2 * self.num_patches * d * p2c + 2 * n * d * p2c  # embed + decoder
        h, w = self.patch_embed.img_size
        conv = 2 * h * w * self.in_chans * self.in_chans * 9 if isinstance(self.final_layer, nn.Conv2d) else 0
        return float((self.depth + 1) * block + skips + patches + conv)


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def build_uvit(size: str, **kwargs) -> UViT:
    """A U-ViT of a registered size; kwargs set the rest (img_size, patch_size, in_chans, ...)."""
    if size not in UVIT_SIZES:
        raise ValueError(f"unknown U-ViT size {size!r}; choose one of {', '.join(UVIT_SIZES)}")
    return UViT(**UVIT_SIZES[size], **kwargs)
