"""`dpt-scale sample RECIPE`: stage 3, pseudo images from the stage-2 EMA model, as the shard set
<out>/samples that stage 4 reads (one sample: the image, `cls` = its conditioning class, `json` =
index, seed, solver, steps, guidance and the checkpoint's checksum).

Shard s goes to rank s % world and holds images [s S, (s + 1) S); image i depends only on (seed, i,
model, sampler settings) (generation/plan.py), so any number of ranks writes the same bytes. A
shard becomes visible only when complete, then a progress record beside it marks it done; a
restarted run skips the done shards and redoes the rest. Rank 0 writes the manifest last, from the
progress records, so nothing re-reads the images. `generation.json` pins the settings: a
restart with other settings is refused rather than mixing two runs in one set.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from dpt_scale.classification.pseudo_labels import MANIFEST as LABELS_MANIFEST
from dpt_scale.classification.pseudo_labels import read_manifest
from dpt_scale.diffusion.export import load_diffusion
from dpt_scale.diffusion.sampling import sample as run_solver
from dpt_scale.diffusion.sampling import to_uint8
from dpt_scale.diffusion.schedules import build_schedule
from dpt_scale.distributed import init_distributed
from dpt_scale.engine.export import weights_identity
from dpt_scale.errors import UserError
from dpt_scale.generation.plan import GenerationPlan
from dpt_scale.generation.writer import BackgroundShardWriter
from dpt_scale.layout import layout
from dpt_scale.recipe import Recipe
from dpt_scale.shards.manifest import ShardEntry, write_json
from dpt_scale.shards.per_shard import PROGRESS, run_per_shard
from dpt_scale.shards.writer import TMP_SUFFIX, SetStats

log = logging.getLogger(__name__)
SETTINGS = "generation.json"


def sample(recipe: Recipe) -> Path:
    rank, world, device = init_distributed()
    cfg = recipe.sample
    out = layout(recipe).samples
    weights = Path(cfg.checkpoint or layout(recipe).diffusion / "weights.pt")
    model, payload = load_diffusion(recipe, weights, device)
    if cfg.precision == "bf16":
        model = model.to(torch.bfloat16)  # the solver casts its input to the weights' type
    settings, classes = payload["settings"], payload["classes"]
    plan = _plan(recipe, len(classes))
    shape = (settings["in_chans"], settings["img_size"], settings["img_size"])
    decoder = _decoder(payload, cfg.decode_batch, device)
    generation = {"checkpoint": weights_identity(weights), "seed": plan.seed, "images": plan.total,
                  "class_weights": plan.class_weights, "solver": cfg.solver, "steps": cfg.steps,
                  "guidance": cfg.guidance, "batch": cfg.batch, "shard_samples": cfg.shard_samples,
                  "format": cfg.format, "quality": cfg.quality}
    if cfg.precision != "fp32":  # absent for fp32: a set written by an fp32 run stays resumable as it was
        generation["precision"] = cfg.precision
    generation = json.loads(json.dumps(generation))  # as it reads back from generation.json (tuples -> lists)
    _claim(out, generation, rank)
    schedule = build_schedule(payload["schedule"])
    meta = {k: generation[k] for k in ("seed", "solver", "steps", "guidance", "checkpoint")}

    def work(todo: list[int]) -> int:
        left = sum(len(plan.shard_indices(s)) for s in todo)
        bar = tqdm(total=left, unit="img", desc=f"sample (rank 0 of {world})", smoothing=0.05,
                   disable=rank != 0 or not logging.getLogger().isEnabledFor(logging.INFO))  # -q: no bar
        with BackgroundShardWriter(out, cfg.format, cfg.quality, cfg.encode_threads) as writer:
            for s in todo:
                generate_shard(s, writer, bar)
        bar.close()
        return left

    def generate_shard(s: int, writer: BackgroundShardWriter, bar) -> None:
        histogram = [0] * len(classes)
        for indices in plan.batches(s):
            labels, noise, generators = plan.draw(indices, shape)
            x = run_solver(model, schedule, labels.to(device), shape, cfg.steps, cfg.guidance,
                           null_class=len(classes), noise=noise.to(device), solver=cfg.solver,
                           generators=generators, prediction=payload.get("prediction", "epsilon"))
            if decoder is not None:
                x = decoder(x)
            images = to_uint8(x).cpu()
            writer.put(_shard_name(s), [{"__key__": f"g{i:09d}", "cls": c, "json": {**meta, "index": i}}
                                        for i, c in zip(indices, labels.tolist())],
                       images.permute(0, 2, 3, 1).numpy())
            for c in labels.tolist():
                histogram[c] += 1
            bar.update(len(indices))
        record = {"histogram": histogram, "image_shape": list(images.shape[1:])}
        writer.end_shard(_shard_name(s), lambda entry: write_json(
            out / PROGRESS / f"{entry.name}.json", {"entry": entry.__dict__, **record}))

    run_per_shard(plan.shards, lambda s: _done(out, s), work, lambda: _write_manifest(out, plan, classes, generation),
                  "generated", size=lambda s: len(plan.shard_indices(s)), unit="images")
    return out


def _plan(recipe: Recipe, num_classes: int) -> GenerationPlan:
    cfg = recipe.sample
    weights = None
    if cfg.total is not None and cfg.class_distribution == "pseudo_labels":
        path = layout(recipe).pseudo_labels
        if not (path / LABELS_MANIFEST).is_file():
            raise UserError(f"sample.class_distribution=pseudo_labels needs {path / LABELS_MANIFEST}; run "
                            "`dpt-scale pseudo-label` first or use class_distribution=uniform")
        counts = read_manifest(path)["selection"].get("counts")
        if counts is None:
            raise UserError(f"{path / LABELS_MANIFEST} has no selection.counts, the class distribution "
                            "sample.class_distribution=pseudo_labels draws from; rerun `dpt-scale pseudo-label`")
        weights = tuple(float(c) for c in counts)
        if not sum(weights):
            raise UserError(f"{path / LABELS_MANIFEST}: the pseudo-label selection kept no image, so it gives no "
                            "class distribution; lower classifier.pseudo_label.threshold, or use "
                            "sample.class_distribution=uniform")
    elif cfg.total is not None:
        weights = (1.0,) * num_classes
    total = cfg.total if cfg.total is not None else cfg.per_class * num_classes
    return GenerationPlan(total, num_classes, recipe.seed if cfg.seed is None else cfg.seed, cfg.shard_samples,
                          cfg.batch, weights)


def _decoder(payload: dict, chunk: int, device: torch.device):
    """Latent models: decode to pixels in chunks of `chunk` images (the autoencoder's activations
    at full resolution are what bounds memory here)."""
    latent = payload.get("latent")
    if not latent:
        return None
    from dpt_scale.diffusion.autoencoder import LatentAutoencoder

    vae = LatentAutoencoder(latent["autoencoder"], latent["scale_factor"]).to(device)
    return lambda z: vae.decode(z.float(), chunk=chunk)


def _claim(out: Path, generation: dict, rank: int) -> None:
    """Make `out` this run's, or check that it already is (a restart with the same settings)."""
    path = out / SETTINGS
    if path.is_file():
        before = json.loads(path.read_text())
        differ = sorted(k for k in generation.keys() | before.keys() if before.get(k) != generation.get(k))
        if differ:
            raise UserError(f"{out} holds images of another generation run (it differs in {', '.join(differ)}); "
                            f"delete {out} to generate anew, or set `out` to a new folder")
    dist.barrier()  # every rank has read the old settings before rank 0 may write new ones
    if rank == 0:
        (out / PROGRESS).mkdir(parents=True, exist_ok=True)
        (out / "manifest.json").unlink(missing_ok=True)  # not a finished set until rewritten
        write_json(path, generation)
    dist.barrier()


def _shard_name(shard: int) -> str:
    return f"samples-{shard:06d}.tar"


def _done(out: Path, shard: int) -> bool:
    return (out / PROGRESS / f"{_shard_name(shard)}.json").is_file() and (out / _shard_name(shard)).is_file()


def _write_manifest(out: Path, plan: GenerationPlan, classes: list[str], generation: dict) -> None:
    records = [json.loads((out / PROGRESS / f"{_shard_name(s)}.json").read_text()) for s in range(plan.shards)]
    stats = SetStats([0] * len(classes))
    for r in records:
        c, h, w = r["image_shape"]
        stats.merge(SetStats(r["histogram"], 0, {c}, (h, w), (h, w)))
    manifest = stats.manifest([ShardEntry(**r["entry"]) for r in records], classes, generation["format"],
                              {"generated": generation, "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
    for stray in [*out.glob(f"*{TMP_SUFFIX}"), *(out / PROGRESS).glob(f"*{TMP_SUFFIX}")]:
        stray.unlink()  # left by a crash in an earlier attempt: every shard is done now
    manifest.save(out)
    log.info(f"{out}: {plan.total} images in {plan.shards} shard(s)")
