"""The network a self-supervised method trains: a backbone and the method's head.

The backbone is an `ImageClassifier` without a classification head (uint8-scale images in,
pooled features out), so pretraining normalises and resizes exactly as stage 1 will. The head is
the method's (a rotation classifier, a projector, prototypes); only the backbone is exported.
"""
from __future__ import annotations

import torch
from torch import nn

from dpt_scale.errors import UserError
from dpt_scale.models.classifier import ImageClassifier

# What token dropping needs of a timm model: the parts of VisionTransformer.forward_features.
VIT_PARTS = ("patch_embed", "_pos_embed", "patch_drop", "norm_pre", "blocks", "norm", "forward_head",
             "num_prefix_tokens")


class PretrainNet(nn.Module):
    def __init__(self, encoder: ImageClassifier, head: nn.Module):
        super().__init__()
        self.encoder, self.head = encoder, head

    def features(self, images: torch.Tensor, mask_ratio: float = 0.0) -> torch.Tensor:
        if not mask_ratio:
            return self.encoder(images)
        return masked_vit_features(self.encoder, images, mask_ratio)

    def forward(self, images: torch.Tensor, mask_ratio: float = 0.0, **head_inputs):
        return self.head(self.features(images, mask_ratio), **head_inputs)


def check_vit(encoder: ImageClassifier, method: str) -> None:
    missing = [part for part in VIT_PARTS if not hasattr(encoder.net, part)]
    if missing:
        raise UserError(f"pretrain.method {method} drops patch tokens, which needs a timm VisionTransformer; "
                        f"{type(encoder.net).__name__} has no {missing[0]}: set classifier.model.name to a ViT "
                        "(e.g. test_vit with classifier.model.kwargs {patch_size: 4} on 28 px images)")


def masked_vit_features(encoder: ImageClassifier, images: torch.Tensor, mask_ratio: float) -> torch.Tensor:
    """A timm ViT's pooled features with a random `mask_ratio` of each image's patch tokens dropped
    (MSN's random masking): the prefix (class) tokens stay, the kept patches keep their positions."""
    net = encoder.net
    x = net.patch_embed(encoder.prepare(images))
    x = net.norm_pre(net.patch_drop(net._pos_embed(x)))
    prefix, patches = x[:, :net.num_prefix_tokens], x[:, net.num_prefix_tokens:]
    keep = max(1, round(patches.shape[1] * (1 - mask_ratio)))
    order = torch.rand(patches.shape[:2], device=x.device).argsort(dim=1)[:, :keep]
    patches = patches.gather(1, order[..., None].expand(-1, -1, patches.shape[2]))
    x = net.norm(net.blocks(torch.cat([prefix, patches], dim=1)))
    return net.forward_head(x, pre_logits=True)


def projector(dim: int, widths: list[int]) -> nn.Sequential:
    """SimCLR's / MSN's MLP: Linear-BN-ReLU for each hidden width, then a plain Linear."""
    if not widths:
        raise UserError("a projector needs at least one width (the output's); e.g. [256, 128]")
    layers: list[nn.Module] = []
    for width in widths[:-1]:
        layers += [nn.Linear(dim, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True)]
        dim = width
    return nn.Sequential(*layers, nn.Linear(dim, widths[-1]))
