"""Feature extractors for generation metrics, by name (`evaluate.evaluator` in a recipe).

An evaluator maps a uint8 (N, C, H, W) batch, as `map_shards` hands it out, to float32 features
(N, D) for FID/KID/precision/recall and, where it has a classifier head over the data set's own
classes, logits for conditional accuracy.

- `inception`: torch-fidelity's InceptionV3 (the TF-compatible port every published FID uses),
  2048-d pool features, from a local weights file; nothing is downloaded. Its 1008 logits are
  ImageNet's (TF ordering), not the data set's classes, so it reports no conditional accuracy.
- `mnist`: an evaluation-only classifier shipped with the package (tools/make_mnist_evaluator.py),
  trained on the embedded MNIST subset, where Inception features describe digits poorly.
- `trained`: an evaluation-only classifier `dpt-scale make-evaluator` trained on every true label
  of this data set's training shards (stages/make_evaluator.py), named by their checksum.
- `auto`: `mnist` for the embedded MNIST (by the reference manifest's provenance, not its shape:
  on other 28x28 images it would score real images at chance), else the trained evaluator of this
  training set where one was made, else `inception` where its weights are given, else an error
  saying how to get one.

`identity` (the weights' checksum) keys the reference-feature cache: other weights, other cache.
"""
from __future__ import annotations

import importlib.resources
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from dpt_scale.engine.export import weights_identity
from dpt_scale.errors import UserError
from dpt_scale.recipe.schema import Evaluate
from dpt_scale.shards.manifest import Manifest

log = logging.getLogger(__name__)
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
    ceiling: float | None = None  # its own top-1 on real validation images: what a conditional accuracy reads against

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.extract(images)


EVALUATORS: dict[str, Callable[[Evaluate, Manifest, torch.device], Evaluator]] = {}


def register(name: str):
    def add(fn):
        EVALUATORS[name] = fn
        return fn
    return add


def build_evaluator(cfg: Evaluate, reference: Manifest, device: torch.device) -> Evaluator:
    """cfg.trained.weights must be resolved (see trained_evaluator_path)."""
    return EVALUATORS[cfg.evaluator](cfg, reference, device)


def trained_evaluator_path(data_root: str | Path, train: Manifest) -> Path:
    """Where make-evaluator puts the evaluator of a training set: named by the set's checksum, so a
    re-imported set never meets the evaluator of the old one."""
    return Path(data_root) / f"evaluator-{train.identity()}.pt"


def _shape(manifest: Manifest) -> tuple[int, list[int] | None]:
    return manifest.image["channels"], manifest.image["size"]


def _classifier_evaluator(name: str, path: Path, device: torch.device, shape: tuple | None) -> Evaluator:
    """A classifier export as an evaluator: its penultimate features, and its logits over the data
    set's classes for conditional accuracy."""
    from dpt_scale.models.classifier import load_classifier

    model = load_classifier(path, device=device)
    payload = torch.load(path, map_location="cpu", weights_only=False)
    net = model.net
    shape = shape or (payload["settings"]["in_chans"], [payload["settings"]["img_size"]] * 2)

    @torch.no_grad()
    def extract(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feature_map = net.forward_features(model.prepare(images))
        return net.forward_head(feature_map, pre_logits=True).float(), net.forward_head(feature_map).float()

    def accepts(manifest: Manifest, where: Path) -> None:
        channels, size = _shape(manifest)
        if (channels, size) != shape:
            shown = f"{channels}x{'x'.join(map(str, size))}" if size else f"{channels}-channel images of several sizes"
            raise UserError(f"the {name} evaluator reads {shape[0]}x{'x'.join(map(str, shape[1]))} images; {where} "
                            f"holds {shown}: use --set evaluate.evaluator=inception (with evaluate.inception_weights), "
                            "or make one for these images with `dpt-scale make-evaluator`")

    return Evaluator(name, f"{name}:{weights_identity(path)}", net.num_features, extract, payload["classes"], accepts,
                     ceiling=payload.get("val_top1"))


def embedded_mnist(manifest: Manifest) -> bool:
    return manifest.meta.get("source") == "mnist" and _shape(manifest) == MNIST_SHAPE


@register("mnist")
def mnist(cfg: Evaluate, reference: Manifest, device: torch.device) -> Evaluator:
    if not embedded_mnist(reference):
        log.warning("the mnist evaluator was trained on the embedded MNIST subset; on a reference set imported "
                    f"from {reference.meta.get('source', 'elsewhere')!r} its FID and conditional accuracy may mean "
                    "nothing (make one for this set: `dpt-scale make-evaluator`)")
    resource = importlib.resources.files("dpt_scale").joinpath("assets/mnist_evaluator.pt")
    with importlib.resources.as_file(resource) as path:
        return _classifier_evaluator("mnist", path, device, MNIST_SHAPE)


@register("trained")
def trained(cfg: Evaluate, reference: Manifest, device: torch.device) -> Evaluator:
    path = Path(cfg.trained.weights)
    if not path.is_file():
        raise UserError(f"no trained evaluator at {path}: make one with `dpt-scale make-evaluator RECIPE` (an "
                        "evaluation-only classifier on the training set's true labels)")
    return _classifier_evaluator("trained", path, device, None)


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
    if embedded_mnist(reference):
        return mnist(cfg, reference, device)
    if cfg.trained.weights and Path(cfg.trained.weights).is_file():
        return trained(cfg, reference, device)
    if cfg.inception_weights:
        return inception(cfg, reference, device)
    looked = f" (none at {cfg.trained.weights})" if cfg.trained.weights else ""
    raise UserError(f"no evaluator for these images: the shipped mnist evaluator knows only the embedded MNIST and "
                    f"none was made for this training set{looked}; run `dpt-scale make-evaluator RECIPE` (an "
                    "evaluation-only classifier on its true labels), or use Inception: --set "
                    f"evaluate.inception_weights=/path/to/{INCEPTION_FILE} (torch-fidelity's InceptionV3 weights; "
                    "nothing is downloaded)")
