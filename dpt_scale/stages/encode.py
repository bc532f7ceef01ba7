"""`dpt-scale encode RECIPE`: the latent path's training data, the autoencoder posterior of every
training image, extracted once (as the reference does) so that stage 2 never runs the encoder.

<data root>/latents/train is an ordinary shard set: one shard per image shard, under the same name,
and one sample per image, under the same key, with
    moments.npy  float16 (V, 2, C, h, w): [mean, log-variance] of the image and, when
                 diffusion.flip is on (V = 2), of its mirror image (the mirror's own posterior,
                 not mirrored moments: the encoder does not commute with flips)
    cls          the image's own label, only where it has one (training under diffusion.labels=pseudo
                 never reads it: the loader takes the pseudo-labels by key instead, as on pixels)
Training draws a fresh z = scale (mean + exp(logvar / 2) noise) from the moments at every step.

Shard i goes to rank i % world. A finished shard gets a progress record naming the image shard's
checksum, the autoencoder's identity and the flip setting, so a restarted run skips exactly the
shards that still hold. Rank 0 writes the manifest last; its meta["latent"] says what the set was
made from and `latent_set` (dpt_scale/diffusion/latents.py) checks that against a recipe before
anything trains or samples on it.
"""
from __future__ import annotations

import io
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from dpt_scale.diffusion.autoencoder import LatentAutoencoder, autoencoder_identity
from dpt_scale.diffusion.latents import MOMENTS, autoencoder_path, source_digest
from dpt_scale.distributed import init_distributed
from dpt_scale.errors import ShardError, UserError
from dpt_scale.layout import layout
from dpt_scale.recipe import Recipe
from dpt_scale.shards.manifest import MANIFEST, Manifest, ShardEntry, write_json
from dpt_scale.shards.map_shards import ShardOutput, map_shards
from dpt_scale.shards.per_shard import PROGRESS, run_per_shard
from dpt_scale.shards.writer import TMP_SUFFIX, SetStats, ShardWriter

log = logging.getLogger(__name__)


def encode(recipe: Recipe) -> Path:
    rank, world, device = init_distributed()
    source, out = layout(recipe).train, layout(recipe).latents
    path = autoencoder_path(recipe)
    images = Manifest.load(source)
    vae = LatentAutoencoder(path).to(device)
    spec = _spec(recipe, path, vae, source, images)
    if _matches(out, spec):
        log.info(f"{out}: already encoded with this autoencoder")
        return out
    (out / PROGRESS).mkdir(parents=True, exist_ok=True)
    dist.barrier()  # every rank has checked the old manifest before rank 0 removes it
    if rank == 0:
        (out / MANIFEST).unlink(missing_ok=True)  # not a finished set until rewritten

    def done(i: int) -> bool:
        entry = images.shards[i]
        record = _read_json(out / PROGRESS / f"{entry.name}.json")
        return (record is not None and (out / entry.name).is_file() and record["source_sha256"] == entry.sha256
                and all(record[k] == spec[k] for k in ("identity", "flips")))

    workers = recipe.data.loader.workers  # image-decoding processes, as when training
    # diffusion.latent.encode_batch images per encoder pass (twice as many with flips): the encoder's
    # full-resolution activations bound it, as they bound sample.decode_batch when decoding.
    batch = recipe.diffusion.latent.encode_batch

    def work(todo: list[int]) -> int:
        count = 0
        for part in map_shards(_moments_fn(vae, spec["flips"]), source, todo, batch, device, workers, read_labels=True):
            _write_shard(out, images.shards[part.shard], part, spec, images.num_classes)
            count += len(part.keys)
        return count

    run_per_shard(len(images.shards), done, work, lambda: _write_manifest(out, images, spec), "encoded")
    return out


def _spec(recipe: Recipe, path: Path, vae: LatentAutoencoder, source: Path, images: Manifest) -> dict:
    """What the manifest records about the set (meta["latent"])."""
    if images.image is None or images.image["channels"] != vae.in_channels:
        found = images.image and images.image["channels"]
        raise UserError(f"the autoencoder takes {vae.in_channels}-channel images but {source} holds {found}-channel "
                        f"ones; import the images with data.channels={vae.in_channels}")
    size = images.square_size(source, "latent encoding")
    # scale_factor: the autoencoder's own; diffusion.latent.scale_factor may override it when training
    # (the moments are stored unscaled).
    return {"autoencoder": str(path), "identity": autoencoder_identity(path),
            "scale_factor": vae.vae.config.scaling_factor, "shape": list(vae.latent_shape(size)),
            "flips": recipe.diffusion.flip, "dtype": "float16", "source": str(source),
            "source_digest": source_digest(images)}


def _matches(out: Path, spec: dict) -> bool:
    try:
        made = Manifest.load(out).meta.get("latent", {})
    except ShardError:  # none yet, or damaged: encode
        return False
    return all(made.get(k) == spec[k] for k in ("identity", "flips", "source_digest"))


def _moments_fn(vae: LatentAutoencoder, flips: bool):
    def moments(images: torch.Tensor) -> torch.Tensor:
        x = images.float().div_(127.5).sub_(1)
        views = 2 if flips else 1
        mean, logvar = vae.moments(torch.cat([x, x.flip(-1)]) if flips else x)  # one pass for both views
        stacked = torch.stack([mean, logvar], 1)  # (V B, 2, C, h, w)
        return stacked.view(views, len(x), *stacked.shape[1:]).transpose(0, 1).half()
    return moments


def _write_shard(out: Path, source_entry: ShardEntry, part: ShardOutput, spec: dict, num_classes: int) -> None:
    stats = SetStats([0] * num_classes)
    with ShardWriter(out / source_entry.name) as writer:
        for key, moments, label in zip(part.keys, part.outputs.numpy(), part.labels.tolist()):
            buf = io.BytesIO()
            np.save(buf, moments)
            label = label if label >= 0 else None
            writer.write({"__key__": key, MOMENTS: buf.getvalue(), "cls": label})
            stats.add(label, None)
    write_json(out / PROGRESS / f"{source_entry.name}.json",
                {"entry": writer.entry.__dict__, "source_sha256": source_entry.sha256, "identity": spec["identity"],
                 "flips": spec["flips"], "histogram": stats.histogram, "unlabelled": stats.unlabelled})


def _write_manifest(out: Path, images: Manifest, spec: dict) -> None:
    records = [_read_json(out / PROGRESS / f"{e.name}.json") for e in images.shards]
    if any(r is None for r in records):
        raise UserError(f"{out}: some shards have no progress record after every rank finished; rerun the command")
    stats = SetStats([0] * images.num_classes)
    for r in records:
        stats.merge(SetStats(r["histogram"], r["unlabelled"]))
    listed = {e.name for e in images.shards}
    for stray in [*out.glob(f"*{TMP_SUFFIX}"), *(out / PROGRESS).glob(f"*{TMP_SUFFIX}"),
                  *(p for p in out.glob("*.tar") if p.name not in listed),
                  *(p for p in (out / PROGRESS).glob("*.json") if p.name.removesuffix(".json") not in listed)]:
        stray.unlink()  # left by a crash, or by an encode of another image set
    manifest = stats.manifest([ShardEntry(**r["entry"]) for r in records], images.classes, None,
                              {"latent": spec, "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
    manifest.save(out)
    log.info(f"{out}: {manifest.num_samples} latents in {len(records)} shard(s)")


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
