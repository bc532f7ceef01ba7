"""Every flag of every command that takes a number or a choice, given values no command should
take: each ends in exit 2 and one stderr line naming the problem, before any work, never a
traceback; test_pipeline.py runs the same against a finished run, byte for byte. (Recipe keys
are fuzzed in test_recipe_fuzz.py; flags that set a recipe key go through the same checks.)"""
from __future__ import annotations

import argparse

import pytest

from dpt_scale.cli import build_parser, main
from helpers import REPO, make_shard_set

SMOKE = str(REPO / "recipes" / "mnist-smoke.yaml")
BAD = ["-1", "x", "nan", "1e400", "", "99999999999999999999"]


def _commands(parser: argparse.ArgumentParser, prefix=()) -> dict[tuple, argparse.ArgumentParser]:
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found |= _commands(sub, prefix + (name,)) or {prefix + (name,): sub}
    return found


def _typed_flags(parser: argparse.ArgumentParser) -> list[str]:
    return [a.option_strings[-1] for a in parser._actions
            if a.option_strings and (a.type is not None or a.choices is not None) and a.nargs in (None, "?")]


def command_line(command: tuple, run, shards) -> list[str]:
    """The rest of a command line that would run on the run folder `run` and the shard set
    `shards` (the flag under test makes it fail)."""
    out = ["--set", f"out={run}"]
    return {("data", "import"): ["mnist", "--out", str(run / "data")], ("data", "subset"): ["--recipe", SMOKE, *out],
            ("submit",): [SMOKE, "--stage", "sample", "--dry-run", *out], ("study",): [SMOKE, "--out", f"{run}-study"],
            }.get(command, [str(shards)] if command[0] == "shards" else [SMOKE, *out])


def refused(command: tuple, flag: str, value: str, run, shards, capsys) -> str:
    """Run the command with the bad value in this process; its one stderr line, checked."""
    try:
        status = main([*command, *command_line(command, run, shards), f"{flag}={value}", "-q"])
    except SystemExit as exc:  # argparse's usage errors
        status = exc.code
    out, err = capsys.readouterr()
    assert status == 2, (flag, value, out[-500:], err[-2000:])
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, (flag, value, err)
    return err


# plus flags parsed by the command itself
CASES = [(command, flag) for command, sub in _commands(build_parser()).items() for flag in _typed_flags(sub)] + \
    [(("study",), "--seeds")]


def test_the_sweep_covers_the_commands_that_take_numbers():
    covered = {" ".join(c) for c, _ in CASES}
    assert {"shards show", "shards verify", "data import", "data subset", "submit", "run"} <= covered
    assert len(CASES) >= 20


@pytest.mark.parametrize("command, flag", CASES, ids=[f"{' '.join(c)} {f}" for c, f in CASES])
def test_a_bad_flag_value_is_one_line_and_does_nothing(command, flag, tmp_path, capsys):
    make_shard_set(tmp_path / "set", [6, 6])
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for value in BAD:
        refused(command, flag, value, tmp_path / "run", tmp_path / "set", capsys)
        assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before, (flag, value)
