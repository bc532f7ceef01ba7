"""Experiment trackers, as the recipe's `logging` section asks: TensorBoard (the `tensorboard` extra)
and Weights & Biases (the `wandb` extra). Metrics and the report call this module on rank 0 only;
`check` runs on every rank before any work.

A training stage's folder holds its trackers' files: tensorboard/ (event files), wandb/ (W&B's run
files; $WANDB_DIR when set) and wandb-run-id. Each training stage is one W&B run (job_type: the
stage, group: the recipe's name), the report one more; a stage resumed after a kill reads the id back
and continues the same run, and a redone stage (its folder removed) starts a new one.
"""
from __future__ import annotations

import logging
import math
import os
import uuid
from pathlib import Path

from dpt_scale.errors import UserError
from dpt_scale.layout import tensorboard_dir, wandb_run_id

log = logging.getLogger(__name__)
INSTALL = {"tensorboard": 'pip install -e ".[tensorboard]"', "wandb": 'pip install -e ".[wandb]"'}


def check(recipe) -> None:
    """Refuse, before any work, a recipe that asks for a tracker that is not installed."""
    cfg = recipe.logging
    if cfg.tensorboard is True and not _installed("tensorboard"):
        raise UserError("logging.tensorboard is true but tensorboard is not installed; "
                        f"{INSTALL['tensorboard']} (or set logging.tensorboard=auto)")
    if cfg.wandb.project and not _installed("wandb"):
        raise UserError(f"logging.wandb.project is set ({cfg.wandb.project!r}) but wandb is not installed; "
                        f"{INSTALL['wandb']} (or set logging.wandb.project=null)")


def _installed(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


class Trackers:
    """The trackers of one run, each optional: `scalars` and `image` go to all that are open."""

    def __init__(self, tensorboard=None, wandb=None):
        self.tensorboard, self.wandb = tensorboard, wandb

    def scalars(self, step: int, values: dict) -> None:
        values = _numbers(values)
        if self.tensorboard is not None:
            for key, value in values.items():
                self.tensorboard.add_scalar(key, value, step)
        if self.wandb is not None and step >= self.wandb.starting_step:  # below: the resumed run has it
            self.wandb.log(values, step=step)

    def image(self, key: str, path: Path, step: int) -> None:
        if self.tensorboard is not None:
            import numpy as np
            from PIL import Image

            with Image.open(path) as image:
                self.tensorboard.add_image(key, np.asarray(image.convert("RGB")), step, dataformats="HWC")
        if self.wandb is not None and step >= self.wandb.starting_step:
            import wandb

            self.wandb.log({key: wandb.Image(str(path))}, step=step)

    def flush(self) -> None:
        """Called at every checkpoint: what a run killed later resumes from is on disk. (W&B has no
        flush; on resume it gets the steps it lacks again from metrics.jsonl.)"""
        if self.tensorboard is not None:
            self.tensorboard.flush()

    def close(self, failed: bool = False) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish(exit_code=1 if failed else 0)
        self.tensorboard = self.wandb = None


def _numbers(values: dict) -> dict:
    """The finite numbers among `values` (a probe's also name its evaluator, for one)."""
    return {k: float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def open_trackers(recipe, folder: Path, stage: str, start_step: int, history: list[dict]) -> Trackers:
    """The trackers of a training stage writing to `folder`, resumed after `start_step`. `history`
    (the rows of metrics.jsonl up to it) fills in what a W&B run lacks: a run resumed online has the
    steps its server holds, an offline one none, so each offline run's files hold the whole curve."""
    cfg = recipe.logging if recipe is not None else None
    trackers = Trackers(tensorboard=_tensorboard(folder, start_step, cfg.tensorboard if cfg else "auto"))
    if cfg is not None and cfg.wandb.project:
        run = _wandb_run(recipe, folder, stage)
        for row in history:
            if row["step"] >= run.starting_step:
                run.log(_numbers({k: v for k, v in row.items() if k != "step"}), step=row["step"])
        trackers.wandb = run
    return trackers


def _tensorboard(folder: Path, start_step: int, wanted):
    if wanted is False:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # auto: only where the extra is installed (check() refused `true`)
        return None
    # purge_step: events a killed run wrote after its checkpoint are dropped, so no step is shown twice
    return SummaryWriter(str(tensorboard_dir(folder)), purge_step=start_step + 1)


def _wandb_run(recipe, folder: Path, job: str):
    """Start (or resume, by the id kept in `folder`) the W&B run of a stage; its config is the
    resolved recipe."""
    import wandb

    from dpt_scale.recipe import recipe_dict

    cfg = recipe.logging.wandb
    folder.mkdir(parents=True, exist_ok=True)
    id_file = wandb_run_id(folder)
    run_id = id_file.read_text().strip() if id_file.is_file() else None
    if not run_id:
        run_id = uuid.uuid4().hex[:16]
        tmp = id_file.with_name(id_file.name + ".tmp")
        tmp.write_text(run_id + "\n")
        os.replace(tmp, id_file)
    try:
        run = wandb.init(project=cfg.project, entity=cfg.entity, group=cfg.group or recipe.name, job_type=job,
                         name=f"{recipe.name}/{job}", id=run_id, resume="allow", mode=cfg.mode,
                         dir=None if os.environ.get("WANDB_DIR") else str(folder),
                         # the terminal keeps the stage's own output; W&B keeps the metrics
                         settings=wandb.Settings(console="off", silent=True))
    except wandb.Error as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"W&B run {run_id} ({cfg.mode}) could not start: {first}; "
                        + ("run `wandb login`, or set logging.wandb.mode=offline" if cfg.mode == "online"
                           else "see its logs under " + str(folder / "wandb"))) from None
    run.config.update(recipe_dict(recipe), allow_val_change=True)  # a resumed run may change runtime keys
    where = f"offline files in {Path(run.dir).parent} (upload: `wandb sync` that folder)" \
        if cfg.mode == "offline" else run.url
    log.info(f"W&B run {run_id} ({job}): {where}")
    return run


def log_report(recipe, folder: Path, tables: dict[str, tuple[list[str], list[list]]], summary: dict) -> None:
    """The pipeline's report as a W&B run of its own (job_type "report"): `tables` ({name: (columns,
    rows)}) as W&B tables, `summary` as the run's summary. Nothing without logging.wandb.project."""
    if not recipe.logging.wandb.project:
        return
    import wandb

    run = _wandb_run(recipe, folder, "report")
    try:
        run.log({name: wandb.Table(columns=columns, data=rows, allow_mixed_types=True)
                 for name, (columns, rows) in tables.items()})
        run.summary.update({k: v for k, v in summary.items() if v is not None})
    finally:
        run.finish()
