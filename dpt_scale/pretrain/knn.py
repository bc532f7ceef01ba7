"""Is the backbone learning? Leave-one-out k-NN top-1 of its features on the validation shards.

Evaluation only: the validation labels say how well the features separate the classes and never
reach training. Each validation image is classified by a vote of its k most similar others
(cosine similarity, votes weighted by exp(similarity / 0.07), as in Wu et al. 2018 and DINO).
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dpt_scale.recipe.schema import KNNProbe
from dpt_scale.shards.manifest import MANIFEST, Manifest
from dpt_scale.shards.map_shards import map_shards

log = logging.getLogger(__name__)
VOTE_TEMPERATURE = 0.07
ROWS = 1024  # similarity rows at a time


def knn_top1(features: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Leave-one-out: every sample against all the others."""
    features = F.normalize(features.float(), dim=1)
    classes = int(labels.max()) + 1
    k = min(k, len(features) - 1)
    right = 0
    for start in range(0, len(features), ROWS):
        similarity = features[start:start + ROWS] @ features.T
        similarity[torch.arange(len(similarity)), torch.arange(start, start + len(similarity))] = -2  # not itself
        top, index = similarity.topk(k, dim=1)
        votes = torch.zeros(len(similarity), classes).scatter_add_(1, labels[index], (top / VOTE_TEMPERATURE).exp())
        right += int((votes.argmax(1) == labels[start:start + ROWS]).sum())
    return right / len(features)


@torch.no_grad()
def labelled_features(encoder: nn.Module, directory: Path, limit: int, batch: int, device: torch.device,
                      workers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and labels of the first `limit` labelled images of a shard set."""
    manifest = Manifest.load(directory)
    features, labels, count = [], [], 0
    for part in map_shards(encoder, directory, list(range(len(manifest.shards))), batch, device, workers,
                           read_labels=True):
        known = part.labels >= 0
        features.append(part.outputs[known])
        labels.append(part.labels[known])
        count += int(known.sum())
        if count >= limit:
            break
    return torch.cat(features)[:limit], torch.cat(labels)[:limit]


class KNNMonitor:
    """A trainer hook: the k-NN top-1 of the EMA backbone, appended to `out` (JSON lines)."""

    def __init__(self, cfg: KNNProbe, val: Path, encoder_fn: Callable[[], nn.Module], out: Path, batch: int,
                 workers: int):
        self.cfg, self.val, self.encoder_fn, self.out = cfg, val, encoder_fn, out
        self.batch, self.workers = batch, workers
        manifest = Manifest.load(val) if (val / MANIFEST).is_file() else None
        self.usable = manifest is not None and sum(manifest.class_histogram) > 1
        if not self.usable:
            log.warning(f"no labelled validation shards at {val}: the backbone's k-NN accuracy is not measured")

    def last_step(self) -> int | None:
        lines = self.out.read_text().splitlines() if self.out.is_file() else []
        return json.loads(lines[-1])["step"] if lines else None

    def __call__(self, trainer, step: int) -> None:
        if not self.usable:
            return
        ema = trainer.ema.full_state_dict()  # a collective under ZeRO-3: every rank takes part
        if trainer.rank == 0:
            with torch.random.fork_rng(devices=[]):
                encoder = self.encoder_fn()
            state = {**dict(trainer.engine.module.named_buffers()), **ema}
            wanted = encoder.state_dict().keys()
            encoder.load_state_dict({k.removeprefix("encoder."): v for k, v in state.items()
                                     if k.removeprefix("encoder.") in wanted and k.startswith("encoder.")})
            encoder = encoder.to(trainer.device).eval()
            features, labels = labelled_features(encoder, self.val, self.cfg.samples, self.batch, trainer.device,
                                                 self.workers)
            top1 = knn_top1(features, labels, self.cfg.k)
            kept = [line for line in (self.out.read_text().splitlines() if self.out.is_file() else [])
                    if json.loads(line)["step"] < step]  # a resumed run rewrites what it redoes
            record = {"step": step, "knn_top1": top1, "k": self.cfg.k, "samples": len(labels)}
            self.out.write_text("".join(line + "\n" for line in kept + [json.dumps(record)]))
            log.info(f"step {step}: backbone k-NN top-1 {top1:.4f} ({len(labels)} validation images, k={self.cfg.k})")
        if dist.is_initialized():
            dist.barrier()
