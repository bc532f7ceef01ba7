"""Frozen-backbone features for the linear probe, extracted once in a distributed pass and kept as
a shard set (one sample per image: `npy` = float16 feature vector, `cls`), then held in memory.

Rank r extracts every world-th image (labelled subset) or its whole shards (pseudo-image sets);
rank 0 gathers them and writes the set; every rank then reads it back. A finished set is reused
when its manifest names the same backbone, so a restarted stage does not extract twice.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from dpt_scale.data.labelled import LabelledBank
from dpt_scale.models.classifier import ImageClassifier
from dpt_scale.shards.index import load_npy
from dpt_scale.shards.manifest import Manifest
from dpt_scale.shards.map_shards import map_shards
from dpt_scale.shards.tar import iter_samples
from dpt_scale.shards.writer import ShardSetWriter


@torch.no_grad()
def labelled_features(model: ImageClassifier, bank: LabelledBank, out: Path, batch: int, backbone: str) -> LabelledBank:
    rank, world = dist.get_rank(), dist.get_world_size()
    device = next(model.parameters()).device
    if not _finished(out, backbone):
        mine = list(range(rank, len(bank), world))
        feats = [model.features(bank.images[mine[i:i + batch]].to(device)).cpu() for i in range(0, len(mine), batch)]
        _gather_and_write(out, backbone, bank.classes, [bank.keys[i] for i in mine],
                          torch.cat(feats) if feats else torch.empty(0), bank.labels[mine].tolist())
    return load_features(out)


@torch.no_grad()
def shard_set_features(model: ImageClassifier, directory: Path, out: Path, batch: int, workers: int,
                       backbone: str) -> LabelledBank:
    rank, world = dist.get_rank(), dist.get_world_size()
    device = next(model.parameters()).device
    if not _finished(out, backbone):
        manifest = Manifest.load(directory)
        keys, feats, labels = [], [], []
        for part in map_shards(model.features, directory, list(range(rank, len(manifest.shards), world)), batch,
                               device, workers, read_labels=True):
            keys += part.keys
            feats.append(part.outputs)
            labels += part.labels.tolist()
        _gather_and_write(out, backbone, manifest.classes, keys, torch.cat(feats) if feats else torch.empty(0),
                          labels)
    return load_features(out)


def load_features(directory: Path) -> LabelledBank:
    manifest = Manifest.load(directory)
    keys, feats, labels = [], [], []
    for entry in manifest.shards:
        for sample in iter_samples(directory / entry.name, fields=frozenset({"npy", "cls"})):
            keys.append(sample["__key__"])
            feats.append(torch.from_numpy(load_npy(sample["npy"])).float())
            labels.append(int(sample["cls"]))
    return LabelledBank(torch.stack(feats), torch.tensor(labels), keys, manifest.classes)


def _finished(out: Path, backbone: str) -> bool:
    try:
        return Manifest.load(out).meta.get("backbone") == backbone
    except Exception:  # no set yet, or a damaged one: extract again
        return False


def _gather_and_write(out: Path, backbone: str, classes: list[str], keys: list[str], feats: torch.Tensor,
                      labels: list[int]) -> None:
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (keys, feats.half().numpy(), labels))
    if dist.get_rank() == 0:
        rows = sorted((k, f, c) for ks, fs, cs in parts for k, f, c in zip(ks, fs, cs))
        with ShardSetWriter(out, classes=classes, prefix="features", max_samples=100_000, image_field=None,
                            meta={"backbone": backbone}) as writer:
            for key, feat, label in rows:
                buf = io.BytesIO()
                np.save(buf, feat)
                writer.write({"__key__": key, "npy": buf.getvalue(), "cls": label})
    dist.barrier()
