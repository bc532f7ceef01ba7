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


def read_sidecar(directory: Path, shard_name: str, classes: int) -> dict | None:
    """A shard's sidecar, or None when it is missing or damaged (a resumed run then redoes it)."""
    try:
        return _sidecar(directory, shard_name, classes)
    except UserError:
        return None


def read_pseudo_labels(directory: str | Path) -> tuple[dict, list[dict]]:
    """A finished pseudo-label set: its manifest and every sidecar, in shard order, each checked (the
    labels reach an embedding table and a bincount; a damaged file must be named, not read)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    shards, classes = manifest["shards"], len(manifest["counts"])
    sidecars = [_sidecar(directory, name, classes) for name in shards]
    seen: dict[str, str] = {}
    for name, side in zip(shards, sidecars):
        for key in side["keys"]:
            if key in seen:
                where = "twice" if seen[key] == name else f"in {sidecar_name(seen[key])} too"
                raise _damaged(directory / sidecar_name(name), f"key {key[:80]!r} is labelled {where}")
            seen[key] = name
    return manifest, sidecars


def read_manifest(directory: Path) -> dict:
    """The manifest of a finished pseudo-label set, checked."""
    path = directory / MANIFEST
    if not path.is_file():
        raise UserError(f"no finished pseudo-labels at {directory}; run `dpt-scale pseudo-label` first")
    manifest = _json(path)
    counts, shards = manifest.get("counts"), manifest.get("shards")
    selection = manifest.get("selection")
    problem = (
        "it is not a pseudo-label manifest" if manifest.get("format", FORMAT) != FORMAT else
        "counts is not a list of class counts" if not _ints(counts, 0, None) or not counts else
        "shards is not a list of shard names, each once" if not _names(shards) else
        "selection is not a mapping of threshold and top_per_class" if not isinstance(selection, dict) else
        "selection.threshold is not a number from 0 to 1" if not _number(selection.get("threshold"), 0, 1) else
        "selection.top_per_class is not a whole number of at least 0"
        if not _ints([selection.get("top_per_class")], 0, None) else
        "selection.counts is not a count for each class" if "counts" in selection and
        (not _ints(selection["counts"], 0, None) or len(selection["counts"]) != len(counts)) else None)
    if problem:
        raise _damaged(path, problem)
    return manifest


def _sidecar(directory: Path, shard_name: str, classes: int) -> dict:
    path = directory / sidecar_name(shard_name)
    if not path.is_file():
        raise UserError(f"{path}: the sidecar of {shard_name} is missing; rerun `dpt-scale pseudo-label`")
    side = _json(path)
    keys, labels, confidence = side.get("keys"), side.get("labels"), side.get("confidence")
    problem = (
        f"it is the sidecar of {side.get('shard')!r}, not of {shard_name!r}" if side.get("shard") != shard_name else
        "sha256 or classifier is not text" if not all(isinstance(side.get(k), str) for k in ("sha256", "classifier"))
        else "keys is not a list of text keys" if not isinstance(keys, list) or
        not all(isinstance(k, str) and k for k in keys) else
        f"labels is not a list of class indices below {classes}" if not _ints(labels, 0, classes - 1) else
        "confidence is not a list of numbers from 0 to 1" if not isinstance(confidence, list) or
        not all(_number(c, 0, 1) for c in confidence) else
        f"it has {len(keys)} keys, {len(labels)} labels and {len(confidence)} confidences"
        if not len(keys) == len(labels) == len(confidence) else None)
    if problem:
        raise _damaged(path, problem)
    return side


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_bytes().decode())
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _damaged(path, f"not JSON: {str(exc)[:80]}") from None
    if not isinstance(data, dict):
        raise _damaged(path, f"a JSON {type(data).__name__}, not an object")
    return data


def _damaged(path: Path, problem: str) -> UserError:
    return UserError(f"{path} is damaged ({problem}); rerun `dpt-scale pseudo-label`, which redoes what it must")


def _ints(values, low: int, high: int | None) -> bool:
    return isinstance(values, list) and all(type(v) is int and v >= low and (high is None or v <= high)
                                            for v in values)


def _number(value, low: float, high: float) -> bool:
    return type(value) in (int, float) and low <= value <= high  # False for NaN


def _names(names) -> bool:
    return (isinstance(names, list) and len(set(map(str, names))) == len(names) and
            all(isinstance(n, str) and n and "/" not in n and "\0" not in n and n not in (".", "..") for n in names))


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
    manifest, sidecars = read_pseudo_labels(directory)
    keys = [k for s in sidecars for k in s["keys"]]
    labels = torch.tensor([l for s in sidecars for l in s["labels"]], dtype=torch.long)
    if only_selected:
        confidence = torch.tensor([c for s in sidecars for c in s["confidence"]])
        cfg = PseudoLabel(threshold=manifest["selection"]["threshold"],
                          top_per_class=manifest["selection"]["top_per_class"])
        keep = selected(keys, labels, confidence, len(manifest["counts"]), cfg)
        return {k: int(l) for k, l, ok in zip(keys, labels, keep.tolist()) if ok}
    return dict(zip(keys, labels.tolist()))
