"""`dpt-scale run RECIPE`: every stage of the pipeline in order, skipping the finished ones.

The plan is made once, before anything changes, from the completion markers (markers.py):
  skip    done, with the same recipe parts and the same inputs
  resume  started with the same key but not finished: the stage picks up its own checkpoints
  run     no marker: a first run, or one that adopts (resumes) outputs made by `dpt-scale STAGE`
  redo    its parts or inputs changed, or --from/--only names it: its outputs are removed first
  leave   outside --from/--only; must be done if a stage that runs reads it
Every rank makes the same plan; stages run on every rank (distributed ones) or on rank 0.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist
import yaml

from dpt_scale import jsonsafe
from dpt_scale.distributed import rank_and_world
from dpt_scale.engine import trackers
from dpt_scale.errors import UserError, check_writable
from dpt_scale.layout import layout
from dpt_scale.pipeline.markers import parts_hash, read_marker, write_marker
from dpt_scale.pipeline.stages import PIPELINE, STAGES, Stage, parts_of
from dpt_scale.recipe import Recipe, save_recipe

log = logging.getLogger(__name__)
RUNS = ("run", "resume", "redo")


@dataclass
class Step:
    stage: Stage
    action: str  # skip | resume | run | redo | leave
    reason: str
    key: dict  # {"parts_hash", "inputs": {stage: id}} of this recipe


def plan(recipe: Recipe, start: str | None = None, only: str | None = None, until: str | None = None) -> list[Step]:
    if only and until:
        raise UserError("--only runs one stage; --until has nothing to add to it")
    active = [s for s in PIPELINE.values() if s.when(recipe)]
    names = [s.name for s in active]
    for flag, name in (("--from", start), ("--only", only), ("--until", until)):
        if name is not None and name not in names:
            why = "it does not apply to this recipe" if name in PIPELINE else "no such stage"
            raise UserError(f"{flag} {name}: {why}; stages of this recipe: {', '.join(names)}")
    first = names.index(start) if start else None
    last = names.index(until) if until else len(names) - 1
    if first is not None and first > last:
        raise UserError(f"--from {start} comes after --until {until}; stages of this recipe: {', '.join(names)}")
    markers = {n: read_marker(recipe, n) for n in names}
    steps: dict[str, Step] = {}
    for i, stage in enumerate(active):
        inputs = [u for u in stage.after(recipe) if u in names]
        parts = parts_of(recipe, stage)
        key = {"parts_hash": parts_hash(parts), "inputs": {u: (markers[u] or {}).get("id") for u in inputs}}
        marker = markers[stage.name]
        # outputs made by hand (no marker) are adopted as they are, so only a redo spreads downstream
        rerun = [u for u in inputs if steps[u].action == "redo"]
        if i > last:
            action, reason = "leave", f"after --until {until}"
        elif (only and stage.name != only) or (first is not None and i < first):
            action, reason = "leave", "outside " + (f"--only {only}" if only else f"--from {start}")
        elif only or first is not None:
            action, reason = "redo", f"--{'only' if only else 'from'} {only or start}"
        elif rerun:
            action, reason = "redo", f"{rerun[0]} runs again"
        elif marker is None:
            action, reason = "run", "not run yet"
        elif _same_key(marker, key):
            action, reason = ("skip", "done") if marker["state"] == "done" else ("resume", "interrupted")
        else:
            action, reason = "redo", _what_changed(marker, parts, key)
        steps[stage.name] = Step(stage, action, reason, key)
    _check_left_inputs(recipe, steps, markers)
    # Settings a stage would refuse, refused before anything runs. A stage that resumes started
    # with these very settings, and may no longer read what a fresh start checks (an init file).
    for step in steps.values():
        if step.action in ("run", "redo") and step.stage.check is not None:
            step.stage.check(recipe)
    return list(steps.values())


def _same_key(marker: dict, key: dict) -> bool:
    return marker.get("parts_hash") == key["parts_hash"] and marker.get("inputs") == key["inputs"]


def _what_changed(marker: dict, parts: dict, key: dict) -> str:
    old = marker.get("parts", {})
    changed = sorted(k for k in parts.keys() | old.keys() if parts.get(k) != old.get(k))
    if changed:
        return "recipe changed: " + ", ".join(changed[:4]) + (" ..." if len(changed) > 4 else "")
    inputs = [u for u in key["inputs"] if marker.get("inputs", {}).get(u) != key["inputs"][u]]
    return f"{', '.join(inputs) or 'an input'} changed since it ran"


def _check_left_inputs(recipe: Recipe, steps: dict[str, Step], markers: dict) -> None:
    """A stage that runs must find what it reads: a stage left out of --from/--only must be done."""
    for step in steps.values():
        if step.action not in RUNS:
            continue
        for u in step.key["inputs"]:
            if steps[u].action == "leave":
                if (markers[u] or {}).get("state") != "done":
                    raise UserError(f"{step.stage.name} reads the outputs of {u}, which has not finished under "
                                    f"{recipe.out}; run `dpt-scale run` without --from/--only (or --from {u})")
                if markers[u].get("parts_hash") != steps[u].key["parts_hash"]:
                    change = _what_changed(markers[u], parts_of(recipe, steps[u].stage), steps[u].key)
                    log.warning(f"{u} ran with other settings ({change}); {step.stage.name} reads its outputs "
                                "anyway, as --from/--only asked")


def run_pipeline(recipe: Recipe, start: str | None = None, only: str | None = None,
                 dry_run: bool = False, until: str | None = None) -> Path | list[Step]:
    from dpt_scale.pipeline.report import write_report

    rank, world = rank_and_world()
    if world > 1:
        from dpt_scale.distributed import init_distributed

        init_distributed()
    check_out(recipe)
    steps = plan(recipe, start, only, until)
    if rank == 0:
        print(plan_table(steps), flush=True)
    if dry_run:
        return steps
    _barrier(world)  # every rank has read the markers before any is rewritten
    if rank == 0:
        save_recipe(recipe, layout(recipe).recipe)
    todo = [s for s in steps if s.action in RUNS]
    for n, step in enumerate(todo, 1):
        stage = step.stage
        # the inputs' ids as they are now: a stage that ran before this one has a new id
        step.key["inputs"] = {u: (read_marker(recipe, u) or {}).get("id") for u in step.key["inputs"]}
        if rank == 0:
            log.info(f"== [{n}/{len(todo)}] {stage.name}: {stage.summary} ({step.action}: {step.reason}) ==")
            if step.action == "redo":
                for path in stage.outputs(recipe):
                    _remove(path)
            write_marker(recipe, stage.name, {"state": "running", **_record(recipe, step), "started": time.time()})
        _barrier(world)
        began = time.perf_counter()
        result = stage.run(recipe) if stage.distributed or rank == 0 else None
        _barrier(world)
        if rank == 0:
            write_marker(recipe, stage.name, {"state": "done", "id": uuid.uuid4().hex[:12], **_record(recipe, step),
                                              "action": step.action, "wall_s": round(time.perf_counter() - began, 1),
                                              "finished": time.time(), "result": _jsonable(result)})
    report = None
    if rank == 0:
        report = write_report(recipe)
    _barrier(world)
    return report


def run_stage(name: str, recipe: Recipe):
    """One stage by itself (`dpt-scale NAME RECIPE`, `submit --stage NAME`): it writes no marker,
    and a later `run` adopts its outputs."""
    check_out(recipe)  # not into another run's folder, nor a folder of unrelated files
    return STAGES[name].run(recipe)


def check_out(recipe: Recipe) -> None:
    """What every stage command and `run` check before any work. `out` must be new, empty, or this
    run's: in a folder holding another recipe's run, that run's stages would be redone (their outputs
    removed first), and a folder of unrelated files is most likely a mistyped path. A run is another
    one when the recipe it saved has another `name`. The trackers `logging` asks for must be installed."""
    trackers.check(recipe)
    out = Path(recipe.out)
    check_writable(out, "pass --set out=DIR")
    if not out.is_dir():
        return
    saved = layout(recipe).recipe
    if saved.is_file():
        try:
            other = (yaml.safe_load(saved.read_text()) or {}).get("name")
        except (yaml.YAMLError, AttributeError):
            other = None
        if other != recipe.name:
            raise UserError(f"{out} holds another run ({saved} names {other!r}, this recipe {recipe.name!r}); "
                            f"pass another --set out=DIR, or remove {out} to start over")
    ours = {p.name for p in layout(recipe).run_files} | {p.relative_to(out).parts[0] for stage in PIPELINE.values()
                             for p in stage.outputs(recipe) if p.is_relative_to(out)}
    entries = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    if entries and not ours & set(entries):
        raise UserError(f"{out} holds files that are not a dpt-scale run ({', '.join(entries[:3])}"
                        f"{', ...' if len(entries) > 3 else ''}); pass another --set out=DIR, or empty it")


def _record(recipe: Recipe, step: Step) -> dict:
    return {**step.key, "parts": parts_of(recipe, step.stage)}


def plan_table(steps: list[Step]) -> str:
    width = max(len(s.stage.name) for s in steps)
    return "# plan\n" + "\n".join(f"  {s.stage.name:<{width}}  {s.action:<6}  {s.reason}" for s in steps)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def _jsonable(result):
    return json.loads(jsonsafe.dumps(result, "stage marker", default=str))
