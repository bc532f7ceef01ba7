"""`dpt-scale shards show`: a PNG grid of samples, so that a person can look at a shard set."""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from torchvision.transforms.v2.functional import resize
from torchvision.utils import make_grid

from dpt_scale.errors import UserError
from dpt_scale.shards.decode import decode_image
from dpt_scale.shards.manifest import Manifest
from dpt_scale.shards.tar import iter_samples

LABEL_WIDTH = 64


def sample_grid(directory: str | Path, out: str | Path, n: int = 64, per_class: int | None = None,
                cell: int | None = None) -> Path:
    """The first `n` samples, or `per_class` samples of every class (one row per class, labelled)."""
    directory, out = Path(directory), Path(out)
    manifest = Manifest.load(directory)
    if manifest.image is None:
        raise UserError(f"{directory}: this shard set holds no images to show")
    cell = cell or min(max(manifest.image["max_size"]), 128)
    picked = _collect(directory, manifest, cell, n, per_class)
    if not picked:
        raise UserError(f"{directory}: no samples to show")
    out.parent.mkdir(parents=True, exist_ok=True)
    if per_class is None:
        images = [im for label in picked for im in picked[label]]
        grid = make_grid(images[:n], nrow=math.ceil(math.sqrt(len(images[:n]))), padding=2)
        Image.fromarray(grid.permute(1, 2, 0).numpy()).save(out)
        return out
    rows = []
    for label in sorted(picked):
        row = picked[label] + [torch.zeros(3, cell, cell, dtype=torch.uint8)] * (per_class - len(picked[label]))
        rows.extend(row)
    grid = Image.fromarray(make_grid(rows, nrow=per_class, padding=2).permute(1, 2, 0).numpy())
    canvas = Image.new("RGB", (grid.width + LABEL_WIDTH, grid.height))
    canvas.paste(grid, (LABEL_WIDTH, 0))
    draw = ImageDraw.Draw(canvas)
    for row, label in enumerate(sorted(picked)):
        name = manifest.classes[label] if label >= 0 else "(none)"
        draw.text((4, 2 + row * (cell + 2) + cell // 2 - 5), name[:10], fill=(255, 255, 255))
    canvas.save(out)
    return out


def _collect(directory: Path, manifest: Manifest, cell: int, n: int, per_class: int | None) -> dict[int, list]:
    """class -> images (3, cell, cell), read in shard order until there are enough."""
    field, channels = manifest.image["field"], manifest.image["channels"]
    target = per_class * manifest.num_classes if per_class else n
    picked: dict[int, list] = defaultdict(list)
    taken = 0
    for entry in manifest.shards:
        for sample in iter_samples(directory / entry.name, fields=frozenset({field, "cls"})):
            label = int(sample.get("cls", -1))
            if per_class and (label < 0 or len(picked[label]) >= per_class):
                continue
            image = resize(decode_image(sample[field], channels), [cell, cell], antialias=True)
            picked[label].append(image.expand(3, -1, -1))
            taken += 1
            if taken == target:
                return picked
    return picked
