"""Rules that tie several keys of a recipe together, checked when it loads: what the optimizer,
the scheduler, the solver or the batch arithmetic would refuse later (as a traceback mid-run), or
accept and quietly make nonsense of. One key's own rules live in the schema's metadata."""
from __future__ import annotations

from dpt_scale.errors import RecipeError
from dpt_scale.recipe.schema import Recipe, Train

# The discrete steps both noise schedules train with (dpt_scale/diffusion/schedules.py; a test
# holds them equal): a solver cannot take more steps than there are.
SCHEDULE_STEPS = 1000


def check_rules(recipe: Recipe) -> None:
    trainings = {"diffusion.train": recipe.diffusion.train, "classifier.train": recipe.classifier.train,
                 "pretrain.train": recipe.pretrain.train}
    if recipe.classifier.retrain.train is not None:
        trainings["classifier.retrain.train"] = recipe.classifier.retrain.train
    for path, train in trainings.items():
        _check_train(path, train)
    if recipe.sample.steps > SCHEDULE_STEPS:
        _refuse(f"'sample.steps' {recipe.sample.steps} is more than the {SCHEDULE_STEPS} steps the noise schedule "
                f"has; give at most {SCHEDULE_STEPS} (DPM-Solver++ needs 10-50)")
    if recipe.diffusion.fid_samples and not recipe.diffusion.train.sample_every:
        _refuse(f"'diffusion.fid_samples' {recipe.diffusion.fid_samples} is never used: the in-training FID runs "
                "every 'diffusion.train.sample_every' steps, which is 0; set it, or fid_samples to 0")
    _check_normalisation(recipe)


def _check_train(path: str, train: Train) -> None:
    if train.warmup_steps > train.steps:
        _refuse(f"'{path}.warmup_steps' {train.warmup_steps} is more than '{path}.steps' {train.steps}: the learning "
                f"rate would never reach '{path}.lr'; give a warm-up of at most {train.steps} steps")
    if train.offload == "cpu" and train.zero_stage == 0:
        _refuse(f"'{path}.offload' cpu needs ZeRO stage 1, 2 or 3; set '{path}.zero_stage'")
    if train.ema_decay >= 1.0 and not train.ema_warmup:
        _refuse(f"'{path}.ema_decay' 1 with '{path}.ema_warmup' false keeps the EMA at its first weights; "
                "give a decay below 1 (e.g. 0.9999)")
    if train.global_batch is not None:
        per_step = train.micro_batch * (train.grad_accum or 1)
        if train.global_batch % per_step:
            accum = f" x grad_accum {train.grad_accum}" if train.grad_accum else ""
            what = f"micro_batch {train.micro_batch}{accum}"
            _refuse(f"'{path}.global_batch' {train.global_batch} is not a multiple of {what}: no number of ranks "
                    f"adds up to it; give a multiple of {per_step}")


def _check_normalisation(recipe: Recipe) -> None:
    model = recipe.classifier.model
    for name in ("mean", "std"):
        values = getattr(model, name)
        if values is None:
            continue
        fits = (1, recipe.data.channels) if recipe.data.channels else (1, 3)
        if len(values) not in fits:
            _refuse(f"'classifier.model.{name}' has {len(values)} values; give one per image channel "
                    f"({' or '.join(map(str, sorted(set(fits))))})")
    if model.mean is not None and model.std is not None and len(model.mean) != len(model.std):
        _refuse(f"'classifier.model.mean' has {len(model.mean)} values and 'classifier.model.std' {len(model.std)}; "
                "give both per channel")


def _refuse(message: str) -> None:
    raise RecipeError(f"recipe: {message}")
