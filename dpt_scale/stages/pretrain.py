"""`dpt-scale pretrain RECIPE` (stage 0): a self-supervised backbone from the training shards.

`pretrain.method` (dpt_scale.pretrain) trains `classifier.model` with a method head through the
same DeepSpeed trainer as every stage (ZeRO, EMA, exact resume). The training images are read
without their labels: the loader never opens a `cls` member. With `pretrain.knn.every` the EMA
backbone's k-NN top-1 on the validation shards is logged (evaluation only, `knn.jsonl`).

Outputs in `pretrain.out` (default <out>/pretrain): backbone.pt (what
`classifier.model.pretrained: pretrain` loads), weights.pt (backbone and head), checkpoints/,
metrics.jsonl, knn.jsonl, settings.json (what the backbone was made with: a folder holding another
backbone is refused, not resumed) and recipe.yaml.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import torch.distributed as dist

from dpt_scale.data.importer import check_settings
from dpt_scale.distributed import init_distributed
from dpt_scale.errors import UserError
from dpt_scale.layout import layout
from dpt_scale.models.classifier import ImageClassifier, check_model_name, normalisation, pretrain_meta
from dpt_scale.pretrain import build_method
from dpt_scale.pretrain.backbone import BACKBONE, pretrain_dir, pretrain_seed, write_backbone
from dpt_scale.pretrain.knn import KNNMonitor
from dpt_scale.pretrain.net import PretrainNet
from dpt_scale.recipe import Recipe, flatten, save_recipe
from dpt_scale.shards.loader import ShardLoader
from dpt_scale.shards.manifest import Manifest, write_json

log = logging.getLogger(__name__)
SETTINGS = "settings.json"
# Keys of the pretrain section that change how fast or how visibly it runs, not the backbone.
RUNTIME = ("out", "knn", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints", "train.sample_every")


def backbone_settings(recipe: Recipe, manifest: Manifest) -> dict:
    """Everything the backbone depends on, flat: the pretrain section, the architecture, the seed,
    the data stream and the training images themselves."""
    section = flatten(asdict(recipe.pretrain))
    settings = {f"pretrain.{k}": v for k, v in section.items() if not any(_under(k, r) for r in RUNTIME)}
    model = asdict(recipe.classifier.model)
    settings.update({f"classifier.model.{k}": v for k, v in model.items() if k != "pretrained"})
    loader = recipe.data.loader
    settings.update({"seed": pretrain_seed(recipe), "data.loader.streams": loader.streams,
                     "data.loader.shuffle_buffer": loader.shuffle_buffer, "data.loader.on_corrupt": loader.on_corrupt,
                     "train shards": manifest.identity()})
    return settings


def encoder_settings(recipe: Recipe, manifest: Manifest, directory: Path) -> dict:
    """The backbone's ImageClassifier arguments: no head, the recipe's normalisation (0.5 / 0.5 by default)."""
    model = recipe.classifier.model
    channels = manifest.image["channels"]
    mean, std = normalisation(model.name, None, channels, model.mean, model.std)
    size = manifest.square_size(directory, "pretraining")
    return dict(name=model.name, num_classes=0, in_chans=channels, img_size=size, mean=mean, std=std,
                input_size=model.input_size, crop_pct=model.crop_pct, model_kwargs=model.kwargs)


def check_pretrain(recipe: Recipe) -> None:
    """What can be refused before anything runs: the method, its settings and the timm model name."""
    build_method(recipe.pretrain)
    check_model_name(recipe.classifier.model.name)


def pretrain(recipe: Recipe) -> Path:
    from dpt_scale.engine.trainer import Trainer

    init_distributed()
    cfg = recipe.pretrain
    method = build_method(cfg)
    out = pretrain_dir(recipe)
    train_dir = layout(recipe).train
    manifest = Manifest.load(train_dir)
    check_settings(recipe, train_dir, manifest)
    encoder = encoder_settings(recipe, manifest, train_dir)
    method.check(ImageClassifier(**encoder))  # e.g. msn needs a ViT: said before the trainer starts
    settings = backbone_settings(recipe, manifest)
    _claim(out, settings)
    backbone = out / BACKBONE
    made = pretrain_meta(backbone) if backbone.is_file() else None
    if made is not None and made.get("settings") == settings:  # e.g. a study's shared backbone
        log.info(f"stage 0: {backbone} is already made with these settings")
        return backbone

    def model_fn() -> PretrainNet:
        backbone = ImageClassifier(**encoder)
        return PretrainNet(backbone, method.head(backbone.net.num_features))

    seed = pretrain_seed(recipe)
    knn = KNNMonitor(cfg.knn, layout(recipe).val, lambda: ImageClassifier(**encoder), out / "knn.jsonl",
                     recipe.classifier.pseudo_label.batch, recipe.classifier.pseudo_label.workers)
    trainer = Trainer(cfg.train, out, model_fn=model_fn, loss_fn=method.loss, seed=seed,
                      export_extra={"kind": "pretrain", "settings": encoder, "method": cfg.method},
                      hooks=[knn], hook_every=cfg.knn.every, recipe=recipe, stage="pretrain")
    if hasattr(method, "attach"):
        method.attach(trainer, model_fn)
    # labels={}: the shards' labels are not even read (the hidden-label guarantee, for every label)
    loader = ShardLoader(train_dir, cfg.train.micro_batch, seed=seed, settings=recipe.data.loader, labels={},
                         rank=trainer.rank, world_size=trainer.world, pin_memory=trainer.device.type == "cuda")
    if trainer.rank == 0:  # after the loader, which refuses a set too small for the batch
        save_recipe(recipe, out / "recipe.yaml")
    weights = trainer.fit(loader)
    if knn.last_step() != trainer.step:
        knn(trainer, trainer.step)
    if trainer.rank == 0:
        knn_top1 = json.loads((out / "knn.jsonl").read_text().splitlines()[-1])["knn_top1"] if knn.usable else None
        meta = {"method": cfg.method, "model": encoder["name"], "kwargs": encoder["model_kwargs"],
                "in_chans": encoder["in_chans"], "img_size": encoder["img_size"], "input_size": encoder["input_size"],
                "crop_pct": encoder["crop_pct"], "mean": encoder["mean"], "std": encoder["std"], "steps": trainer.step,
                "seed": seed, "knn_top1": knn_top1, "settings": settings}
        write_backbone(weights, backbone, json.loads(json.dumps(meta)))
        log.info(f"stage 0 ({cfg.method}): backbone {backbone}" + (f", k-NN top-1 {knn_top1:.4f}" if knn_top1 else ""))
    dist.barrier()
    return backbone


def _claim(out: Path, settings: dict) -> None:
    """A pretrain folder holds one backbone: resume it, or refuse to mix in another."""
    path = out / SETTINGS
    if path.is_file():
        old = json.loads(path.read_text())
        changed = sorted(k for k in settings.keys() | old.keys() if settings.get(k) != old.get(k))
        if changed:
            raise UserError(f"{out} holds a backbone pretrained with other settings ({', '.join(changed[:3])}"
                            f"{' ...' if len(changed) > 3 else ''} differ); remove it to pretrain again, or set "
                            "pretrain.out to another folder")
        return
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"{out} holds files but no {SETTINGS}: it is not a stage-0 folder; set pretrain.out to "
                        "another folder, or empty it")
    if dist.get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        write_json(path, settings, indent=1)
    dist.barrier()


def _under(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith(prefix + ".")
