"""`dpt-scale data import` and `dpt-scale data subset`."""
from __future__ import annotations

import argparse
import typing
from pathlib import Path

from dpt_scale.cli.registry import command, recipe_arguments, resolve_recipe
from dpt_scale.layout import layout
from dpt_scale.recipe import save_recipe
from dpt_scale.recipe.schema import Data


def _import_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", choices=typing.get_args(typing.get_type_hints(Data)["source"]),
                   help="mnist: the embedded subset; imagefolder ROOT; idx IMAGES LABELS; webdataset URL [URL ...]")
    p.add_argument("paths", nargs="*", metavar="PATH",
                   help="the source's inputs (webdataset: tar files, data-{000000..000099}.tar, pipe:CMD, URLs)")
    p.add_argument("--out", metavar="DIR", help="shard sets go to DIR/train and DIR/val (recipe: data.root)")
    p.add_argument("--val", nargs="+", metavar="PATH", help="validation inputs, same form as PATH")
    p.add_argument("--val-fraction", type=float, metavar="F", help="hold out this fraction of train as val")
    p.add_argument("--image-size", type=int, metavar="N", help="resize the shorter side to N, centre crop NxN")
    p.add_argument("--channels", type=int, choices=[1, 3], help="store grayscale (1) or RGB (3)")
    p.add_argument("--format", choices=["png", "jpg", "webp"], help="image encoding in the shards")
    p.add_argument("--shard-samples", type=int, metavar="N", help="at most N samples per shard")
    p.add_argument("--workers", type=int, metavar="N", help="decoding/encoding processes")
    p.add_argument("--image-field", metavar="FIELD",
                   help="webdataset: the image member, first present of ;-separated names (data.webdataset.image)")
    p.add_argument("--label", metavar="FIELD",
                   help="webdataset: the label: cls, txt, json:KEY, or none (data.webdataset.label)")
    p.add_argument("--classes", metavar="FILE",
                   help="webdataset: class names, one per line, for labels given by name (data.webdataset.classes)")
    p.add_argument("--force", action="store_true", help="replace shard sets imported with other settings")
    recipe_arguments(p)


@command("data import", "import images (embedded MNIST, an image folder, IDX files, webdataset shards) into shard sets",
         _import_arguments)
def data_import(args: argparse.Namespace) -> None:
    from dpt_scale.data.importer import import_data

    flags = {"data.source": (args.source, "source"), "data.paths": (args.paths, "PATH"),
             "data.root": (args.out, "--out"), "data.val_paths": (args.val, "--val"),
             "data.val_fraction": (args.val_fraction, "--val-fraction"),
             "data.image_size": (args.image_size, "--image-size"), "data.channels": (args.channels, "--channels"),
             "data.format": (args.format, "--format"), "data.shard_samples": (args.shard_samples, "--shard-samples"),
             "data.import_workers": (args.workers, "--workers"),
             "data.webdataset.image": (args.image_field, "--image-field"),
             "data.webdataset.label": (args.label, "--label"), "data.webdataset.classes": (args.classes, "--classes")}
    recipe = resolve_recipe(args, {k: v for k, v in flags.items() if v[0] is not None})
    import_data(recipe, force=args.force)
    save_recipe(recipe, layout(recipe).data_recipe)


def _subset_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shards", metavar="DIR", help="training shard set (default: <data.root>/train)")
    p.add_argument("--per-class", type=int, metavar="K", help="K labelled images per class (data.labelled.per_class)")
    p.add_argument("--seed", type=int, metavar="S", help="which K per class (data.labelled.seed)")
    p.add_argument("--from-list", metavar="FILE", help="keys or file names, one per line (data.labelled.list)")
    p.add_argument("--out", metavar="FILE", help="where to write the key list (default: <out>/labelled.txt)")
    recipe_arguments(p)


@command("data subset", "choose the labelled images: K per class, or from a list of names", _subset_arguments)
def data_subset(args: argparse.Namespace) -> None:
    from dpt_scale.data.subset import make_subset, subset_path

    flags = {"data.labelled.per_class": (args.per_class, "--per-class"),
             "data.labelled.seed": (args.seed, "--seed"), "data.labelled.list": (args.from_list, "--from-list")}
    recipe = resolve_recipe(args, {k: v for k, v in flags.items() if v[0] is not None})
    shards = Path(args.shards or layout(recipe).train)
    out = Path(args.out or subset_path(recipe))
    keys, how = make_subset(recipe, shards, out)
    save_recipe(recipe, out.with_suffix(".recipe.yaml"))
    print(f"{out}: {len(keys)} labelled keys ({how})")
