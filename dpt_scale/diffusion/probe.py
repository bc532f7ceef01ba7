"""What stage 2 shows while it trains, every train.sample_every steps: a PNG grid of EMA samples,
one row per class (16 classes at most, evenly spaced), and with diffusion.fid_samples an
in-training FID (+ conditional accuracy) of unguided EMA samples appended to fid.jsonl."""
from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch
import torch.distributed as dist
from torchvision.utils import save_image

from dpt_scale import jsonsafe
from dpt_scale.diffusion.autoencoder import LatentAutoencoder
from dpt_scale.diffusion.sampling import sample, to_uint8
from dpt_scale.metrics.generation import image_metrics, reference_for
from dpt_scale.models import build_uvit
from dpt_scale.recipe import Recipe

log = logging.getLogger(__name__)
GRID_PER_CLASS = 8  # samples per class in the grid
GRID_CLASSES = 16  # rows at most: ImageNet's 1,000 classes would make an 8,000-image grid
GRID_STEPS = 25


class DiffusionProbe:
    """A trainer hook: `probe(trainer, step)` on every rank (the EMA gather and the reference
    features are collectives); rank 0 samples and writes."""

    def __init__(self, recipe: Recipe, settings: dict, schedule, classes: list[str], latent: dict | None, out: Path):
        self.recipe, self.settings, self.schedule, self.classes = recipe, settings, schedule, classes
        self.latent, self.out = latent, Path(out)
        self.reference = None  # the FID's evaluator and reference features, fetched once

    @functools.cached_property
    def autoencoder(self) -> LatentAutoencoder:
        """Latent models: the grids' decoder, loaded once, by rank 0 only."""
        return LatentAutoencoder(self.latent["autoencoder"], self.latent["scale_factor"])

    def generate(self, model: torch.nn.Module, labels: torch.Tensor, seed: int) -> torch.Tensor:
        """Unguided samples as pixels in [-1, 1], as the reference's in-training FID takes them."""
        size, channels = self.settings["img_size"], self.settings["in_chans"]
        generator = torch.Generator(device=labels.device).manual_seed(seed)
        noise = torch.randn(len(labels), channels, size, size, generator=generator, device=labels.device)
        x = sample(model, self.schedule, labels, noise.shape[1:], GRID_STEPS, null_class=len(self.classes),
                   noise=noise, prediction=self.recipe.diffusion.prediction)
        if not self.latent:
            return x
        return self.autoencoder.to(labels.device).decode(x.float(), chunk=self.recipe.sample.decode_batch)

    def _batched(self, model: torch.nn.Module, labels: torch.Tensor, seed: int) -> torch.Tensor:
        batch = self.recipe.sample.batch
        return torch.cat([self.generate(model, labels[i:i + batch], seed + i) for i in range(0, len(labels), batch)])

    def __call__(self, trainer, step: int) -> None:
        fid_samples = self.recipe.diffusion.fid_samples
        ema = trainer.ema.full_state_dict()  # a collective under ZeRO-3: every rank takes part
        if fid_samples and self.reference is None:
            self.reference = reference_for(self.recipe, trainer.device)  # a collective too
        if trainer.rank == 0:
            model = build_uvit(**self.settings).to(trainer.device).eval()
            model.load_state_dict(ema)
            classes = len(self.classes)
            rows = torch.linspace(0, classes - 1, min(classes, GRID_CLASSES), device=trainer.device).round().long()
            x = self._batched(model, rows.repeat_interleave(GRID_PER_CLASS), self.recipe.seed)
            (self.out / "samples").mkdir(parents=True, exist_ok=True)
            grid = self.out / "samples" / f"step-{step:08d}.png"
            save_image((x.float() + 1) / 2, grid, nrow=GRID_PER_CLASS)
            trainer.metrics.probe(step, images={"samples": grid})
            if fid_samples:
                labels = torch.arange(fid_samples, device=trainer.device) % classes
                images = to_uint8(self._batched(model, labels, self.recipe.seed + 1))
                evaluator, features = self.reference
                metrics = image_metrics(evaluator, features, images, labels, self.classes,
                                        self.recipe.evaluate.kid_subset_size, self.recipe.evaluate.batch)
                with open(self.out / "fid.jsonl", "a") as f:
                    f.write(jsonsafe.dumps({"step": step, **metrics}, "fid.jsonl") + "\n")
                trainer.metrics.probe(step, {f"in_training/{k}": v for k, v in metrics.items()})
                log.info(f"step {step}: in-training FID {metrics['fid']:.3f} ({fid_samples} unguided EMA samples), "
                         f"conditional accuracy {metrics['conditional_accuracy']}")
        dist.barrier()
