"""Pseudo-labels on disk: one sidecar per training shard, plus a manifest written last.

    <out>/pseudo_labels/train-000003.labels.json   {"shard", "sha256", "classifier", "keys",
                                                    "labels", "confidence"}  (sample order)
    <out>/pseudo_labels/manifest.json              counts, histogram, agreement, selection

Pseudo-labels belong to sample keys, not to copies of the images (ImageNet is too big to copy
for a label). A sidecar names the shard's checksum and the classifier it came from, so a
restarted run keeps exactly the sidecars that still hold, and a sidecar never silently outlives
the data or model it describes.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from dpt_scale.errors import UserError
from dpt_scale.recipe.schema import PseudoLabel
from dpt_scale.shards.manifest import write_json

FORMAT = "dpt_scale.pseudo_labels/1"
MANIFEST = "manifest.json"
BINS = 20  # confidence histogram over [0, 1]


def sidecar_name(shard_name: str) -> str:
    return shard_name.removesuffix(".tar") + ".labels.json"


def write_sidecar(directory: Path, shard_name: str, sha256: str, classifier: str, keys: list[str],
                  probs: torch.Tensor) -> None:
    confidence, labels = probs.max(1)
    write_json(directory / sidecar_name(shard_name),
               {"shard": shard_name, "sha256": sha256, "classifier": classifier, "keys": keys,
                "labels": labels.tolist(), "confidence": [round(c, 6) for c in confidence.tolist()]})


def read_sidecar(directory: Path, shard_name: str) -> dict | None:
    path = directory / sidecar_name(shard_name)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # missing, or cut short by a crash before the rename (cannot happen) or by hand


def summarise(sidecars: list[dict], num_classes: int, cfg: PseudoLabel, true_labels: dict[str, int] | None) -> dict:
    """Per-class counts, confidence histogram, what the selection keeps, and agreement with the
    true labels where the shards have them (evaluation only: nothing trains on this)."""
    labels = torch.tensor([l for s in sidecars for l in s["labels"]])
    confidence = torch.tensor([c for s in sidecars for c in s["confidence"]])
    keys = [k for s in sidecars for k in s["keys"]]
    chosen = selected(keys, labels, confidence, num_classes, cfg)
    out = {"samples": len(keys), "counts": torch.bincount(labels, minlength=num_classes).tolist(),
           "confidence_histogram": torch.histc(confidence, BINS, 0, 1).long().tolist(),
           "mean_confidence": float(confidence.mean()),
           "selection": {"threshold": cfg.threshold, "top_per_class": cfg.top_per_class,
                         "selected": int(chosen.sum()),
                         "counts": torch.bincount(labels[chosen], minlength=num_classes).tolist()}}
    if true_labels:
        truth = torch.tensor([true_labels.get(k, -1) for k in keys])
        known = truth >= 0
        out["agreement"] = float((labels[known] == truth[known]).float().mean())
        out["agreement_selected"] = float((labels[known & chosen] == truth[known & chosen]).float().mean()) \
            if (known & chosen).any() else None
        out["agreement_samples"] = int(known.sum())
    return out


def selected(keys: list[str], labels: torch.Tensor, confidence: torch.Tensor, num_classes: int,
             cfg: PseudoLabel) -> torch.Tensor:
    """Which samples stage 2 may use: confidence >= threshold, then at most the `top_per_class`
    most confident per class (ties broken by key, so the choice never depends on shard order)."""
    keep = confidence >= cfg.threshold
    if cfg.top_per_class:
        order = sorted(range(len(keys)), key=lambda i: (-float(confidence[i]), keys[i]))
        taken = [0] * num_classes
        top = torch.zeros_like(keep)
        for i in order:
            if keep[i] and taken[labels[i]] < cfg.top_per_class:
                taken[labels[i]] += 1
                top[i] = True
        keep = top
    return keep


def load_pseudo_labels(directory: str | Path, only_selected: bool = True) -> dict[str, int]:
    """key -> pseudo-label for every (selected) training sample, from a finished pseudo-label run."""
    directory = Path(directory)
    if not (directory / MANIFEST).is_file():
        raise UserError(f"no finished pseudo-labels at {directory}; run `dpt-scale pseudo-label` first")
    manifest = json.loads((directory / MANIFEST).read_text())
    sidecars = [read_sidecar(directory, name) for name in manifest["shards"]]
    if any(s is None for s in sidecars):
        raise UserError(f"{directory}: a sidecar listed in the manifest is missing; rerun `dpt-scale pseudo-label`")
    keys = [k for s in sidecars for k in s["keys"]]
    labels = torch.tensor([l for s in sidecars for l in s["labels"]])
    if only_selected:
        confidence = torch.tensor([c for s in sidecars for c in s["confidence"]])
        cfg = PseudoLabel(threshold=manifest["selection"]["threshold"],
                          top_per_class=manifest["selection"]["top_per_class"])
        keep = selected(keys, labels, confidence, len(manifest["counts"]), cfg)
        return {k: int(l) for k, l, ok in zip(keys, labels, keep.tolist()) if ok}
    return dict(zip(keys, labels.tolist()))
