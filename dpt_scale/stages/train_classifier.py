"""`dpt-scale train-classifier RECIPE` (stage 1) and `dpt-scale retrain RECIPE` (stage 4).

Stage 1 trains `classifier.method` on the labelled subset (<out>/labelled.txt, drawn from the recipe
when missing) and, for fixmatch, on every training image without its label. Stage 4 trains the
same method again from scratch, with each labelled micro-batch shared between real labelled images
and the pseudo-image shard sets (`classifier.retrain.pseudo_fraction`). Both end by scoring the
EMA weights on the validation shards.

Outputs in <out>/classifier (stage 1) or <out>/retrain (stage 4): checkpoints/, metrics.jsonl,
weights.pt (loads with `dpt_scale.models.load_classifier`), eval.json, confusion.png, recipe.yaml.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch.distributed as dist

from dpt_scale import jsonsafe
from dpt_scale.classification import METHODS
from dpt_scale.classification.evaluate import evaluate_weights
from dpt_scale.classification.mixture import BankSource, Mixture, ShardSource
from dpt_scale.data.augment import weak, weak_and_strong
from dpt_scale.data.importer import check_settings
from dpt_scale.data.labelled import LabelledBank
from dpt_scale.data.subset import make_subset, read_labels, subset_path
from dpt_scale.distributed import init_distributed, rank_and_world
from dpt_scale.errors import UserError
from dpt_scale.layout import layout
from dpt_scale.models.classifier import ImageClassifier, normalisation
from dpt_scale.pretrain.backbone import pretrained_file
from dpt_scale.recipe import Recipe, save_recipe
from dpt_scale.shards.loader import ShardLoader
from dpt_scale.shards.manifest import Manifest

log = logging.getLogger(__name__)


def train_classifier(recipe: Recipe, stage: str = "stage1") -> Path:
    from dpt_scale.engine.trainer import Trainer

    init_distributed()  # stage 4 may write a set on rank 0 while the others wait
    cfg, out = recipe.classifier, layout(recipe).classifier(stage)
    method = METHODS[cfg.method](cfg)
    train_cfg = (cfg.retrain.train or cfg.train) if stage == "retrain" else cfg.train
    train_dir = layout(recipe).train
    manifest = Manifest.load(train_dir)
    size = manifest.square_size(train_dir, "classifier training")
    check_settings(recipe, train_dir, manifest)
    channels = manifest.image["channels"]
    subset = subset_path(recipe)
    if not subset.is_file():  # every rank draws the same keys; the file is replaced atomically
        make_subset(recipe, train_dir, subset)
    bank = LabelledBank.from_subset(train_dir, subset, recipe.data.loader.on_corrupt)
    log.info(f"labelled subset {subset}: {len(bank)} images")
    if not recipe.data.labelled.list and len(bank) != recipe.data.labelled.per_class * manifest.num_classes:
        log.warning(f"{subset} holds {len(bank)} keys, not data.labelled.per_class x {manifest.num_classes} "
                    "classes: it was drawn with other settings (delete it to draw again)")
    pseudo = _pseudo_sets(recipe, manifest, size, bank.keys, out) if stage == "retrain" else []
    pretrained = pretrained_file(recipe)

    mean, std = normalisation(cfg.model.name, pretrained, channels, cfg.model.mean, cfg.model.std)
    settings = dict(name=cfg.model.name, num_classes=manifest.num_classes, in_chans=channels, img_size=size,
                    mean=mean, std=std, frozen_backbone=method.frozen_backbone, input_size=cfg.model.input_size,
                    crop_pct=cfg.model.crop_pct, model_kwargs=cfg.model.kwargs)
    build = lambda: ImageClassifier(**settings, pretrained=pretrained)  # noqa: E731
    if method.frozen_backbone:  # linear probe: from here on, features stand in for images
        bank, pseudo = _features(recipe, build, pretrained, bank, pseudo, out)
        feature_mean = bank.images.mean(0)  # centring, from the labelled features

        def model_fn():
            model = build()
            model.feature_mean.copy_(feature_mean)
            return model
    else:
        model_fn = build
    trainer = Trainer(train_cfg, out, model_fn=model_fn, loss_fn=method.loss, seed=recipe.seed,
                      export_extra={"kind": "classifier", "settings": settings, "classes": manifest.classes,
                                    "method": cfg.method, "stage": stage},
                      recipe=recipe, stage="train-classifier" if stage == "stage1" else stage)
    mixture = _mixture(recipe, train_cfg.micro_batch, method, bank, pseudo, trainer.rank, trainer.world, size,
                       channels, train_dir)
    if trainer.rank == 0:  # after the loaders, which refuse sets too small for the batch
        save_recipe(recipe, out / "recipe.yaml")
    weights = trainer.fit(mixture)
    report = evaluate_weights(recipe, weights, out, trainer.device, title=f"{stage} ({cfg.method})")
    if report and trainer.rank == 0 and stage == "retrain":
        first = layout(recipe).classifier("stage1") / "eval.json"
        if first.is_file():
            report["stage1_top1"] = json.loads(first.read_text())["top1"]
            (out / "eval.json").write_text(jsonsafe.dumps(report, "eval.json", indent=1))
            log.info(f"top-1: stage 4 {report['top1']:.4f}, stage 1 {report['stage1_top1']:.4f}")
    return weights


def _features(recipe: Recipe, build, pretrained: str, bank: LabelledBank, pseudo: list,
              out: Path) -> tuple[LabelledBank, list]:
    """Backbone features of the labelled images and of each pseudo set (stored under out/features)."""
    from dpt_scale.classification.features import labelled_features, shard_set_features
    from dpt_scale.engine.export import weights_identity

    _, _, device = init_distributed()
    model = build().to(device).eval()
    cfg = recipe.classifier
    # the weights' checksum too: a backbone retrained at the same path must not reuse old features
    backbone = f"{cfg.model.name}:{pretrained}:{weights_identity(pretrained)}:{cfg.model.input_size}"
    backbone += f":crop {cfg.model.crop_pct}" if cfg.model.crop_pct else ""
    backbone += f":{cfg.model.kwargs}" if cfg.model.kwargs else ""
    bank = labelled_features(model, bank, out / "features" / "labelled", cfg.pseudo_label.batch, backbone)
    pseudo = [(shard_set_features(model, path, out / "features" / f"pseudo{k}", cfg.pseudo_label.batch,
                                  cfg.pseudo_label.workers, backbone), fraction)
              for k, (path, fraction) in enumerate(pseudo)]
    return bank, pseudo


def _pseudo_sets(recipe: Recipe, manifest: Manifest, size: int, labelled: list[str],
                 out: Path) -> list[tuple[Path, float]]:
    """The shard sets stage 4 adds to the labelled images, with their shares of a micro-batch:
    the generated sets (their first per_class images of each class where that is set), or for the
    self-training control the most confident real images of each pseudo-class."""
    cfg = recipe.classifier.retrain
    if cfg.source == "real":
        if cfg.pseudo:
            raise UserError("classifier.retrain.source real takes real training images: leave "
                            "classifier.retrain.pseudo empty, or set classifier.retrain.source=generated")
        paths = [_self_training_set(recipe, labelled, out)]
    else:
        paths = [Path(p) for p in cfg.pseudo] or [layout(recipe).samples]
        if not cfg.pseudo and not (paths[0] / "manifest.json").is_file():
            raise UserError(f"no pseudo images at {paths[0]}: run `dpt-scale sample` (stage 3) first, or name "
                            "pseudo-image shard sets in classifier.retrain.pseudo")
    if len(cfg.pseudo_fraction) != len(paths):
        raise UserError(f"classifier.retrain.pseudo_fraction has {len(cfg.pseudo_fraction)} value(s) for "
                        f"{len(paths)} pseudo shard set(s); give one per set")
    if sum(cfg.pseudo_fraction) > 1:
        raise UserError(f"classifier.retrain.pseudo_fraction {cfg.pseudo_fraction} adds up to more than 1")
    micro = (cfg.train or recipe.classifier.train).micro_batch  # the shares are rounded to whole images
    counts = [round(micro * f) for f in cfg.pseudo_fraction]
    if any(f > 0 and n == 0 for f, n in zip(cfg.pseudo_fraction, counts)) or \
            (sum(counts) == micro and sum(cfg.pseudo_fraction) < 1):
        raise UserError(f"classifier.retrain.pseudo_fraction {cfg.pseudo_fraction} of a labelled micro-batch of "
                        f"{micro} gives {counts} pseudo and {micro - sum(counts)} real images per step, dropping a "
                        "source the recipe asks for; raise the micro_batch or change the shares")
    for path in paths:
        other = Manifest.load(path)
        if other.classes != manifest.classes:
            raise UserError(f"{path}: its classes differ from the training set's; pseudo images must be "
                            "generated for the same classes")
        if other.square_size(path, "retraining") != size or other.image["channels"] != manifest.image["channels"]:
            raise UserError(f"{path}: images are {other.image['channels']}x{other.image['size']}, the training "
                            f"set's {manifest.image['channels']}x{manifest.image['size']}")
    if cfg.source == "generated" and cfg.per_class:
        paths = [_first_per_class(path, cfg.per_class, out / "pseudo" / f"set{k}") for k, path in enumerate(paths)]
    return list(zip(paths, cfg.pseudo_fraction))


def _first_per_class(source: Path, k: int, copy: Path) -> Path:
    from dpt_scale.classification.selection import copy_chosen, first_per_class

    meta = {"chosen": "first per class", "per_class": k, "source": Manifest.load(source).identity()}
    return _made_once(copy, meta, lambda: copy_chosen(source, copy, first_per_class(source, k), meta))


def _self_training_set(recipe: Recipe, labelled: list[str], out: Path) -> Path:
    """The self-training control's images: per_class (default sample.per_class) real training
    images of each pseudo-class, most confident first, labelled with their pseudo-labels."""
    from dpt_scale.classification.selection import copy_chosen, most_confident_per_class

    k = recipe.classifier.retrain.per_class or recipe.sample.per_class
    pseudo_labels = layout(recipe).pseudo_labels
    copy = out / "self_training"
    identity = json.loads((pseudo_labels / "manifest.json").read_text())["classifier"] \
        if (pseudo_labels / "manifest.json").is_file() else None
    meta = {"chosen": "most confident per pseudo-class", "per_class": k, "pseudo_labels": identity}

    def make():
        chosen = most_confident_per_class(pseudo_labels, k, set(labelled))
        made = copy_chosen(layout(recipe).train, copy, chosen, meta)
        truth = read_labels(layout(recipe).train)  # evaluation only: how right the chosen labels are
        right = sum(truth.get(key) == label for key, label in chosen.items())
        log.info(f"self-training: {len(chosen)} real images, {k} per pseudo-class at most; their pseudo-labels "
                 f"agree with the hidden true labels on {right / max(len(chosen), 1):.4f} (evaluation only)")
        (copy / "agreement.json").write_text(json.dumps({"images": len(chosen),
                                                         "agreement": right / max(len(chosen), 1)}))
        return made

    return _made_once(copy, meta, make)


def _made_once(directory: Path, meta: dict, make) -> Path:
    """Rank 0 makes a set (unless a finished one with the same settings is there); all ranks wait."""
    from dpt_scale.classification.selection import is_complete

    rank, world = rank_and_world()
    if rank == 0 and not is_complete(directory, meta):
        if directory.exists():
            shutil.rmtree(directory)
        make()
    if world > 1:
        dist.barrier()
    return directory


def _mixture(recipe: Recipe, micro: int, method, bank: LabelledBank, pseudo: list[tuple], rank: int,
             world: int, size: int, channels: int, train_dir: Path) -> Mixture:
    """Each step: `micro` labelled images (real ones from the bank, the rest from the pseudo sets
    in the recipe's proportions), plus unlabelled_ratio x micro unlabelled images for fixmatch."""
    cfg = recipe.classifier
    counts = [round(micro * fraction) for _, fraction in pseudo]
    real = micro - sum(counts)
    weak_view = None if method.frozen_backbone else weak(cfg.augment, size)  # features: no augmentation

    def shards(path: Path, batch: int, seed: int, transform, labels=None) -> ShardSource:
        return ShardSource(ShardLoader(path, batch, seed=seed, transform=transform, settings=recipe.data.loader,
                                       labels=labels, rank=rank, world_size=world))

    sources = {}
    if real:
        sources["labelled"] = BankSource(bank, real, rank, world, recipe.seed, weak_view)
    for k, ((source, _), count) in enumerate(zip(pseudo, counts)):
        if count and isinstance(source, LabelledBank):  # linear probe: pseudo-image features in memory
            sources[f"pseudo{k}"] = BankSource(source, count, rank, world, recipe.seed + 1 + k)
        elif count:
            sources[f"pseudo{k}"] = shards(source, count, recipe.seed + 1 + k, weak_view)
    if method.uses_unlabelled:
        # labels={}: the shards' own labels are not even read (the hidden-label guarantee).
        sources["unlabelled"] = shards(train_dir, micro * cfg.fixmatch.unlabelled_ratio, recipe.seed,
                                       weak_and_strong(cfg.augment, size, channels), labels={})
        per_epoch = len(sources["unlabelled"].loader)
    else:
        per_epoch = max(1, len(bank) // (max(real, 1) * world))
    return Mixture(sources, micro, per_epoch)
