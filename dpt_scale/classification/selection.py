"""K images per class picked from a shard set and copied into a set of their own, for stage 4.

Two picks: the first K of each class of a generated set (its keys are the images' global indices,
so the first K are those a run with sample.per_class = K would have made), and the self-training
control's K *real* training images per class, most confident first by their stage-1 pseudo-labels,
which then stand in for the pseudo images. The copy holds the image bytes as they are and the
chosen class as `cls`; the source's own labels are not read.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from dpt_scale.classification.pseudo_labels import read_pseudo_labels, selected
from dpt_scale.errors import UserError
from dpt_scale.recipe.schema import PseudoLabel
from dpt_scale.shards.manifest import MANIFEST, Manifest
from dpt_scale.shards.tar import iter_samples
from dpt_scale.shards.writer import ShardSetWriter

log = logging.getLogger(__name__)


def first_per_class(directory: Path, k: int) -> dict[str, int]:
    """key -> class of the first k samples of each class, in key order."""
    manifest = Manifest.load(directory)
    by_class: dict[int, list[str]] = {}
    for entry in manifest.shards:
        for sample in iter_samples(directory / entry.name, fields=frozenset({"cls"})):
            by_class.setdefault(int(sample["cls"]), []).append(sample["__key__"])
    short = {manifest.classes[c]: len(by_class.get(c, [])) for c in range(manifest.num_classes)
             if len(by_class.get(c, [])) < k}
    if short:
        name, have = next(iter(short.items()))
        raise UserError(f"{directory} holds {have} image(s) of class {name!r}, fewer than classifier.retrain.per_class "
                        f"{k}; sample more (sample.per_class) or lower classifier.retrain.per_class")
    return {key: c for c, keys in by_class.items() for key in sorted(keys)[:k]}


def most_confident_per_class(pseudo_labels: Path, k: int, exclude: set[str]) -> dict[str, int]:
    """key -> pseudo-label of the k most confident training images of each pseudo-class (ties by
    key), leaving out `exclude` (the labelled subset, which stage 4 has already)."""
    manifest, sidecars = read_pseudo_labels(pseudo_labels)
    keys, labels, confidence = [], [], []
    for side in sidecars:
        for key, label, conf in zip(side["keys"], side["labels"], side["confidence"]):
            if key not in exclude:
                keys.append(key)
                labels.append(label)
                confidence.append(conf)
    classes = len(manifest["counts"])
    labels_t = torch.tensor(labels, dtype=torch.long)
    keep = selected(keys, labels_t, torch.tensor(confidence), classes, PseudoLabel(top_per_class=k))
    chosen = {key: label for key, label, ok in zip(keys, labels, keep.tolist()) if ok}
    counts = torch.bincount(torch.tensor(list(chosen.values()), dtype=torch.long), minlength=classes)
    if int(counts.min()) < k:
        log.warning(f"self-training: some pseudo-classes have fewer than {k} images (as few as {int(counts.min())}); "
                    "they contribute what they have")
    return chosen


def copy_chosen(source: Path, out: Path, chosen: dict[str, int], meta: dict) -> Manifest:
    """The chosen samples of `source` (image bytes as stored) with their chosen class, as a shard set."""
    manifest = Manifest.load(source)
    image = manifest.image
    if image is None or not image["size"]:
        raise UserError(f"{source}: stage 4 needs images of one size")
    shape = (image["channels"], *image["size"])
    rows = []
    for entry in manifest.shards:
        for sample in iter_samples(source / entry.name, fields=frozenset({image["field"]})):
            if sample["__key__"] in chosen:
                rows.append((sample["__key__"], sample[image["field"]]))
    with ShardSetWriter(out, classes=manifest.classes, prefix="chosen", image_field=image["field"],
                        meta={"chosen_from": str(source), **meta}) as writer:
        for key, data in sorted(rows):
            writer.write({"__key__": key, image["field"]: data, "cls": chosen[key]}, shape)
    return writer.manifest


def is_complete(directory: Path, meta: dict) -> bool:
    """A copy made earlier with the same settings (a resumed stage 4 keeps it)."""
    try:
        found = Manifest.load(directory).meta if (directory / MANIFEST).is_file() else None
    except Exception:
        return False
    return found is not None and all(found.get(k) == v for k, v in meta.items())
