"""Rank 0's record of a training run: metrics.jsonl (one line per logged step), the experiment
trackers the recipe asks for (engine/trackers.py: TensorBoard, W&B), and a progress bar with
images/s and ETA. On resume the file keeps only the steps up to the checkpoint, so it always reads
as one run."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from tqdm import tqdm

from dpt_scale import jsonsafe
from dpt_scale.engine.trackers import open_trackers


class Metrics:
    def __init__(self, out: Path, total_steps: int, start_step: int, enabled: bool, recipe=None,
                 stage: str = "train"):
        """`recipe` (its `logging` section) chooses the trackers; without one, TensorBoard where installed."""
        self.enabled = enabled
        self.path = out / "metrics.jsonl"
        self.trackers = None
        if not enabled:
            return
        out.mkdir(parents=True, exist_ok=True)
        kept = [line for line in (self.path.read_text().splitlines() if self.path.is_file() else [])
                if line.strip() and json.loads(line)["step"] <= start_step]
        self.path.write_text("".join(line + "\n" for line in kept))
        self.trackers = open_trackers(recipe, out, stage, start_step, [json.loads(line) for line in kept])
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, mininterval=1,
                        disable=not logging.getLogger().isEnabledFor(logging.INFO))  # -q: no bar

    def log(self, step: int, **values: float) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(jsonsafe.dumps({"step": step, **values}, str(self.path)) + "\n")
        self.trackers.scalars(step, values)
        shown = {k: f"{v:.4g}" for k, v in values.items() if k in ("loss", "images_per_s", "mfu")}
        self.bar.set_postfix(shown, refresh=False)

    def probe(self, step: int, values: dict | None = None, images: dict[str, Path] | None = None) -> None:
        """What a trainer hook measured (it keeps its own files): numbers and PNG images, to the trackers."""
        if self.trackers is None:
            return
        if values:
            self.trackers.scalars(step, values)
        for key, path in (images or {}).items():
            self.trackers.image(key, path, step)

    def advance(self, steps: int = 1) -> None:
        if self.enabled:
            self.bar.update(steps)

    def flush(self) -> None:
        """At a checkpoint: the trackers' files up to it are on disk when a kill comes."""
        if self.trackers is not None:
            self.trackers.flush()

    def close(self, failed: bool = False) -> None:
        if self.enabled and self.trackers is not None:
            self.bar.close()
            self.trackers.close(failed)
            self.trackers = None

    def __enter__(self) -> Metrics:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        self.close(failed=kind is not None)  # W&B marks a stopped or failed run as such
