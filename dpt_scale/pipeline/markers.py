"""Completion markers: <out>/stages/STAGE.json, one per pipeline stage.

A marker is written as `running` when a stage starts and rewritten as `done` when it ends; both
carry the stage's key (the hash of its recipe parts and the ids of the stage outputs it read).
A `done` marker also gets a fresh id, so every stage that read the old outputs is out of date.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from dpt_scale.layout import layout
from dpt_scale.recipe import Recipe
from dpt_scale.shards.manifest import write_json


def marker_path(recipe: Recipe, stage: str) -> Path:
    return layout(recipe).markers / f"{stage}.json"


def read_marker(recipe: Recipe, stage: str) -> dict | None:
    try:
        return json.loads(marker_path(recipe, stage).read_text())
    except FileNotFoundError:
        return None
    except ValueError:  # written atomically, so only a hand edit gets here: treat the stage as never run
        return None


def write_marker(recipe: Recipe, stage: str, record: dict) -> None:
    path = marker_path(recipe, stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"stage": stage, **record}, indent=1)


def parts_hash(parts: dict) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
