"""Every stage as a table: what it runs, what it reads, what it makes. The `dpt-scale STAGE`
commands, `run`, `submit` and the SLURM job (stage_job.py) are all made from STAGES.

A stage's completion marker holds a hash of its `parts` (the recipe keys its outputs depend on)
and the ids of the stages it reads (`after`), so changing a key redoes exactly that stage and the
ones downstream of it. Keys that change how fast a stage runs but never what it produces
(`RUNTIME_KEYS`) are left out of every hash: more loader workers must not retrain a model.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from fnmatch import fnmatch
from pathlib import Path

from dpt_scale.layout import layout
from dpt_scale.recipe import Recipe, flatten

# fnmatch patterns over dotted recipe keys
RUNTIME_KEYS = ("data.import_workers", "data.loader.workers", "classifier.pseudo_label.batch",
                "classifier.pseudo_label.workers", "*.log_every", "*.checkpoint_every", "*.keep_checkpoints",
                "*.sample_every", "diffusion.fid_samples", "diffusion.model.attention",
                "diffusion.model.grad_checkpointing", "diffusion.latent.encode_batch", "sample.decode_batch",
                "sample.encode_threads", "evaluate.batch", "logging.*")
# The order of the data stream (and so every trained model) depends on these loader keys.
STREAM = ("seed", "data.loader.streams", "data.loader.shuffle_buffer", "data.loader.on_corrupt")


@dataclass(frozen=True)
class Stage:
    name: str  # as on the command line (`dpt-scale NAME RECIPE`, `run --from NAME`)
    target: str  # "module:function", called as function(recipe, *args); imported when it runs
    # recipe keys the outputs depend on ("!key" leaves a key out), or a function of the recipe giving them
    parts: tuple[str, ...] | Callable[[Recipe], tuple[str, ...]]
    after: Callable[[Recipe], tuple[str, ...]]  # the stages whose outputs it reads
    outputs: Callable[[Recipe], list[Path]]  # removed before the stage is redone
    args: tuple = ()
    when: Callable[[Recipe], bool] = lambda recipe: True  # noqa: E731
    distributed: bool = True  # False: rank 0 runs it while the other ranks wait
    summary: str = ""  # the line `run` logs when it starts the stage
    command: str | None = None  # help of the `dpt-scale NAME RECIPE` command; None: no such command
    pipeline: bool = True  # False: a command of its own, which `run` does not chain
    check: Callable[[Recipe], None] | None = None  # refuses bad settings before any stage runs

    def parts_for(self, recipe: Recipe) -> tuple[str, ...]:
        return self.parts(recipe) if callable(self.parts) else self.parts

    def run(self, recipe: Recipe):
        module, function = self.target.split(":")
        return getattr(importlib.import_module(module), function)(recipe, *self.args)


def _out(*names: str) -> Callable[[Recipe], list[Path]]:
    """Paths of the run's layout (dpt_scale/layout.py) by their names there."""
    return lambda recipe: [getattr(layout(recipe), name) for name in names]


def _latent(recipe: Recipe) -> bool:
    return bool(recipe.diffusion.latent.autoencoder)


def _diffusion_inputs(recipe: Recipe) -> tuple[str, ...]:
    return (("encode",) if _latent(recipe) else ("import",)) + \
        (("pseudo-label",) if recipe.diffusion.labels == "pseudo" else ())


def _sample_inputs(recipe: Recipe) -> tuple[str, ...]:
    by_pseudo_labels = recipe.sample.total and recipe.sample.class_distribution == "pseudo_labels"
    return ("train-diffusion",) + (("pseudo-label",) if by_pseudo_labels else ())


def _pretrain_parts(recipe: Recipe) -> tuple[str, ...]:
    """The backbone depends on the run's seed only where pretrain.seed does not fix its own."""
    own = ("pretrain", "!pretrain.out", "!pretrain.knn", "classifier.model", "!classifier.model.pretrained")
    return own + STREAM[1:] + (("seed",) if recipe.pretrain.seed is None else ())


def _backbone(recipe: Recipe) -> tuple[str, ...]:
    from dpt_scale.pretrain.backbone import uses_pretrain

    return ("pretrain",) if uses_pretrain(recipe) else ()


def _pretrain_outputs(recipe: Recipe) -> list[Path]:
    """A pretrain folder inside the run is the run's own; one outside (shared by runs, e.g. a study's
    seeds) is never removed from here: the stage refuses one that holds another backbone."""
    from dpt_scale.pretrain.backbone import pretrain_dir

    path = pretrain_dir(recipe)
    return [path] if path.resolve().is_relative_to(Path(recipe.out).resolve()) else []


def _generates(recipe: Recipe) -> bool:
    """Stages 2 and 3 run unless stage 4 takes real images (the self-training control)."""
    return recipe.classifier.retrain.source == "generated"


def _check_pretrain(recipe: Recipe) -> None:
    from dpt_scale.stages.pretrain import check_pretrain

    check_pretrain(recipe)


def _check_init(recipe: Recipe) -> None:
    if recipe.diffusion.init:
        from dpt_scale.diffusion.init import check_init

        check_init(recipe)


def _retrain_parts(recipe: Recipe) -> tuple[str, ...]:
    """The self-training control takes sample.per_class real images per class unless per_class says."""
    return STREAM + ("classifier", "!classifier.pseudo_label") + (() if _generates(recipe) else ("sample.per_class",))


def _retrain_inputs(recipe: Recipe) -> tuple[str, ...]:
    return ("subset",) + _backbone(recipe) + (("sample",) if _generates(recipe) else ("pseudo-label",))


def _in_data_root(*names: str) -> Callable[[Recipe], list[Path]]:
    """A data root inside the run is the run's own, and a changed import replaces it; one outside
    (shards shared between runs) is never removed from here: the importer names the difference."""
    def paths(recipe: Recipe) -> list[Path]:
        root = Path(recipe.data_root)
        return [root / n for n in names] if root.resolve().is_relative_to(Path(recipe.out).resolve()) else []
    return paths


def _import(recipe: Recipe) -> dict:
    from dpt_scale.data.importer import import_data

    return {split: m.num_samples for split, m in import_data(recipe).items()}


def _subset(recipe: Recipe) -> dict:
    from dpt_scale.data.subset import make_subset, subset_path

    keys, how = make_subset(recipe, layout(recipe).train, subset_path(recipe))
    return {"labelled": len(keys), "how": how}


IMPORT_KEYS = ("data.source", "data.paths", "data.val_paths", "data.val_fraction", "data.root", "data.image_size",
               "data.channels", "data.format", "data.quality", "data.shard_samples", "data.shard_bytes", "data.seed")
CLASSIFIER = ("classifier", "!classifier.pseudo_label", "!classifier.retrain")


def _import_parts(recipe: Recipe) -> tuple[str, ...]:
    """The webdataset keys count only for that source (so that other imports keep their hash)."""
    return IMPORT_KEYS + (("data.webdataset",) if recipe.data.source == "webdataset" else ())


STAGES: dict[str, Stage] = {s.name: s for s in [
    Stage("import", "dpt_scale.pipeline.stages:_import", _import_parts, lambda r: (),
          _in_data_root("train", "val"), distributed=False, summary="images into train/val shard sets"),
    Stage("subset", "dpt_scale.pipeline.stages:_subset", ("data.labelled",), lambda r: ("import",),
          _out("labelled"), distributed=False, summary="the labelled keys"),
    Stage("pretrain", "dpt_scale.stages.pretrain:pretrain", _pretrain_parts, lambda r: ("import",),
          _pretrain_outputs, when=lambda r: bool(_backbone(r)), check=_check_pretrain,
          summary="stage 0: a self-supervised backbone",
          command="stage 0: a self-supervised backbone from the training shards (no label is read)"),
    Stage("train-classifier", "dpt_scale.stages.train_classifier:train_classifier", STREAM + CLASSIFIER,
          lambda r: ("subset",) + _backbone(r), lambda r: [layout(r).classifier("stage1")], args=("stage1",),
          summary="stage 1",
          command="stage 1: the semi-supervised classifier (fixmatch, linear_probe or supervised)"),
    Stage("pseudo-label", "dpt_scale.stages.pseudo_label:pseudo_label", ("classifier.pseudo_label",),
          lambda r: ("train-classifier",), _out("pseudo_labels"), summary="a label for every training image",
          command="label every training image with the stage-1 classifier (resumable per shard)"),
    Stage("encode", "dpt_scale.stages.encode:encode", ("diffusion.latent", "diffusion.flip"),
          lambda r: ("import",), _in_data_root("latents"), when=lambda r: _latent(r) and _generates(r),
          summary="autoencoder moments (latent recipes)",
          command="latent recipes: autoencoder moments of every training image (resumable per shard)"),
    Stage("train-diffusion", "dpt_scale.stages.train_diffusion:train_diffusion", STREAM + ("diffusion",),
          _diffusion_inputs, _out("diffusion"), when=_generates, check=_check_init, summary="stage 2",
          command="stage 2: the class-conditional U-ViT (any launcher: python, torchrun, deepspeed)"),
    Stage("sample", "dpt_scale.stages.sample:sample", ("seed", "sample"), _sample_inputs, _out("samples"),
          when=_generates, summary="stage 3",
          command="stage 3: pseudo images from the stage-2 model into shards (resumable, any number of ranks)"),
    Stage("retrain", "dpt_scale.stages.train_classifier:train_classifier", _retrain_parts, _retrain_inputs,
          lambda r: [layout(r).classifier("retrain")], args=("retrain",), summary="stage 4",
          command="stage 4: the classifier again, on real plus pseudo images"),
    # The cached reference features in evaluation/cache stay: they depend on the real images only.
    Stage("evaluate", "dpt_scale.stages.evaluate:summary", ("evaluate",),
          lambda r: ("train-classifier", "retrain", "sample"), lambda r: [layout(r).evaluation / "metrics.json"],
          summary="top-1, FID, KID, precision/recall, conditional accuracy",
          command="metrics of the run so far: classifier top-1/top-5 and confusion; FID, KID, precision/recall "
                  "and conditional accuracy of <out>/samples"),
    Stage("make-evaluator", "dpt_scale.stages.make_evaluator:make_evaluator", (), lambda r: (), lambda r: [],
          pipeline=False,
          command="an evaluation-only classifier on every true label of <data.root>/train, for data sets no "
                  "shipped evaluator knows (evaluate.evaluator auto finds it)"),
]}
# The stages `dpt-scale run` chains, in order.
PIPELINE: dict[str, Stage] = {name: s for name, s in STAGES.items() if s.pipeline}


def parts_of(recipe: Recipe, stage: Stage) -> dict:
    """The recipe values a stage's outputs depend on, as a flat {dotted key: value}."""
    flat = flatten(asdict(recipe))
    parts = stage.parts_for(recipe)
    keep = [p for p in parts if not p.startswith("!")]
    drop = [p[1:] for p in parts if p.startswith("!")]

    def under(key: str, prefix: str) -> bool:
        return key == prefix or key.startswith(prefix + ".")

    return {k: v for k, v in flat.items()
            if any(under(k, p) for p in keep) and not any(under(k, p) for p in drop)
            and not any(fnmatch(k, pattern) for pattern in RUNTIME_KEYS)}
