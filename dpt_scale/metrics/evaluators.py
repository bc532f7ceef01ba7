"""Feature extractors for generation metrics, by name (`evaluate.evaluator` in a recipe).

An evaluator maps a uint8 (N, C, H, W) batch, as `map_shards` hands it out, to float32 features
(N, D) for FID/KID/precision/recall and, where it has a classifier head over the data set's own
classes, logits for conditional accuracy.

- `inception`: torch-fidelity's InceptionV3 (the TF-compatible port every published FID uses),
  2048-d pool features, from a local weights file; nothing is downloaded. Its 1008 logits are
  ImageNet's (TF ordering), not the data set's classes, so it reports no conditional accuracy.
- `mnist`: an evaluation-only classifier shipped with the package (tools/make_mnist_evaluator.py),
  for 1-channel 28x28 sets, where Inception features describe digits poorly.
- `auto`: `mnist` when the reference set is 1-channel 28x28, else `inception`.

`identity` (the weights' checksum) keys the reference-feature cache: other weights, other cache.
"""
from __future__ import annotations

import importlib.resources
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from dpt_scale.engine.export import weights_identity
from dpt_scale.errors import UserError
from dpt_scale.recipe.schema import Evaluate
from dpt_scale.shards.manifest import Manifest

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
MNIST_SHAPE = (1, [28, 28])


@dataclass
class Evaluator:
    name: str
    identity: str  # changes whenever the features would
    dim: int  # feature width D
    extract: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]  # uint8 NCHW -> features, logits
    classes: list[str] | None  # what the logits' columns mean; None: no logits
    accepts: Callable[[Manifest, Path], None] | None = None  # raises UserError for a set it cannot read

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.extract(images)


EVALUATORS: dict[str, Callable[[Evaluate, Manifest, torch.device], Evaluator]] = {}


def register(name: str):
    def add(fn):
        EVALUATORS[name] = fn
        return fn
    return add


def build_evaluator(cfg: Evaluate, reference: Manifest, device: torch.device) -> Evaluator:
    return EVALUATORS[cfg.evaluator](cfg, reference, device)


def _shape(manifest: Manifest) -> tuple[int, list[int] | None]:
    return manifest.image["channels"], manifest.image["size"]


@register("mnist")
def mnist(cfg: Evaluate, reference: Manifest, device: torch.device) -> Evaluator:
    from dpt_scale.models.classifier import load_classifier

    resource = importlib.resources.files("dpt_scale").joinpath("assets/mnist_evaluator.pt")
    with importlib.resources.as_file(resource) as path:
        model = load_classifier(path, device=device)
        identity = f"mnist:{weights_identity(path)}"
        classes = torch.load(path, map_location="cpu", weights_only=False)["classes"]
    net = model.net

    @torch.no_grad()
    def extract(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feature_map = net.forward_features(model.prepare(images))
        return net.forward_head(feature_map, pre_logits=True).float(), net.forward_head(feature_map).float()

    def accepts(manifest: Manifest, path: Path) -> None:
        channels, size = _shape(manifest)
        if (channels, size) != MNIST_SHAPE:
            shown = f"{channels}x{'x'.join(map(str, size))}" if size else f"{channels}-channel images of several sizes"
            raise UserError(f"the mnist evaluator reads 1x28x28 images; {path} holds {shown}: use "
                            "--set evaluate.evaluator=inception (with evaluate.inception_weights)")

    return Evaluator("mnist", identity, net.num_features, extract, classes, accepts)


@register("inception")
def inception(cfg: Evaluate, reference: Manifest, device: torch.device) -> Evaluator:
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    how = (f"--set evaluate.inception_weights=/path/to/{INCEPTION_FILE} (torch-fidelity's InceptionV3 "
           "weights; nothing is downloaded)")
    if not cfg.inception_weights:
        raise UserError(f"the inception evaluator needs a local weights file: {how}")
    path = Path(cfg.inception_weights)
    if not path.is_file():
        raise UserError(f"Inception weights not found: {path}; {how}")
    try:
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
    except Exception as exc:  # unpickling or state-dict errors: not the file we need
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path} is not torch-fidelity's InceptionV3 weights ({first}); {how}") from None
    net = net.to(device)

    @torch.no_grad()
    def extract(images: torch.Tensor) -> tuple[torch.Tensor, None]:
        if images.shape[1] == 1:  # grayscale: the same plane in R, G and B, as Inception expects RGB
            images = images.expand(-1, 3, -1, -1)
        (features,) = net(images.contiguous())
        return features, None

    # Any channels and size: it resizes to 299 px itself (TF-compatible bilinear).
    return Evaluator("inception", f"inception:{weights_identity(path)}", 2048, extract, None)


@register("auto")
def auto(cfg: Evaluate, reference: Manifest, device: torch.device) -> Evaluator:
    return EVALUATORS["mnist" if _shape(reference) == MNIST_SHAPE else "inception"](cfg, reference, device)
