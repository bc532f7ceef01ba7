"""Every path of a run's folder and of its data root, named in one place.

    <out>/          recipe.yaml  labelled.txt  stages/  pretrain/  classifier/  pseudo_labels/
                    diffusion/  samples/  retrain/  evaluation/  report.md  report.json  report/  slurm/
    <data.root>/    train/  val/  latents/train/  recipe.yaml  evaluator-<identity>.pt
    a training stage's folder (pretrain/, classifier/, diffusion/, retrain/) and report/ also hold the
    experiment trackers' files: tensorboard/, wandb/ and wandb-run-id (see engine/trackers.py)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# The classifier's two trainings by the name the report and `train_classifier` give them: stage 1
# and stage 4, with the folder each exports to.
CLASSIFIER_STAGES = {"stage1": "classifier", "retrain": "retrain"}


@dataclass(frozen=True)
class RunLayout:
    out: Path
    data: Path

    # the data root: shared by runs that import the same images
    @property
    def train(self) -> Path:
        return self.data / "train"

    @property
    def val(self) -> Path:
        return self.data / "val"

    @property
    def latents(self) -> Path:
        return self.data / "latents" / "train"

    @property
    def data_recipe(self) -> Path:
        return self.data / "recipe.yaml"

    # the run's own folder
    @property
    def recipe(self) -> Path:
        return self.out / "recipe.yaml"

    @property
    def labelled(self) -> Path:
        return self.out / "labelled.txt"

    @property
    def markers(self) -> Path:
        return self.out / "stages"

    @property
    def pretrain(self) -> Path:
        return self.out / "pretrain"

    def classifier(self, stage: str = "stage1") -> Path:
        return self.out / CLASSIFIER_STAGES[stage]

    @property
    def pseudo_labels(self) -> Path:
        return self.out / "pseudo_labels"

    @property
    def diffusion(self) -> Path:
        return self.out / "diffusion"

    @property
    def samples(self) -> Path:
        return self.out / "samples"

    @property
    def evaluation(self) -> Path:
        return self.out / "evaluation"

    @property
    def report(self) -> Path:
        return self.out / "report.md"

    @property
    def report_json(self) -> Path:
        return self.out / "report.json"

    @property
    def figures(self) -> Path:
        return self.out / "report"

    @property
    def slurm(self) -> Path:
        return self.out / "slurm"

    @property
    def run_files(self) -> list[Path]:
        """What a run folder holds besides the stages' outputs."""
        return [self.markers, self.recipe, self.figures, self.report, self.report_json, self.slurm,
                self.labelled.with_suffix(".recipe.yaml")]


def tensorboard_dir(folder: Path) -> Path:
    """A training stage's TensorBoard event files."""
    return Path(folder) / "tensorboard"


def wandb_run_id(folder: Path) -> Path:
    """The W&B run of a training stage's folder (or of report/): a resumed stage continues it, a
    redone one (its folder removed) starts another."""
    return Path(folder) / "wandb-run-id"


def layout(recipe) -> RunLayout:
    return RunLayout(Path(recipe.out), Path(recipe.data_root))
