"""Rank 0's record of a training run: metrics.jsonl (one line per logged step), TensorBoard when it
is installed, and a progress bar with images/s and ETA. On resume the file keeps only the steps up
to the checkpoint, so it always reads as one run."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from tqdm import tqdm

from dpt_scale import jsonsafe


class Metrics:
    def __init__(self, out: Path, total_steps: int, start_step: int, enabled: bool):
        self.enabled = enabled
        self.path = out / "metrics.jsonl"
        self.tensorboard = None
        if not enabled:
            return
        out.mkdir(parents=True, exist_ok=True)
        kept = [line for line in (self.path.read_text().splitlines() if self.path.is_file() else [])
                if line.strip() and json.loads(line)["step"] <= start_step]
        self.path.write_text("".join(line + "\n" for line in kept))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1)
        except ImportError:  # tensorboard is optional
            pass
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, mininterval=1,
                        disable=not logging.getLogger().isEnabledFor(logging.INFO))  # -q: no bar

    def log(self, step: int, **values: float) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(jsonsafe.dumps({"step": step, **values}, str(self.path)) + "\n")
        if self.tensorboard is not None:
            for key, value in values.items():
                self.tensorboard.add_scalar(key, value, step)
        shown = {k: f"{v:.4g}" for k, v in values.items() if k in ("loss", "images_per_s", "mfu")}
        self.bar.set_postfix(shown, refresh=False)

    def advance(self, steps: int = 1) -> None:
        if self.enabled:
            self.bar.update(steps)

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            if self.tensorboard is not None:
                self.tensorboard.close()
