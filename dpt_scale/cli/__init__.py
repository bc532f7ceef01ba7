"""The `dpt-scale` command. Subcommands live in this package's modules and register themselves
with `@command` (registry.py); this module builds the parser and turns failures the user can act on
into one line (console.py)."""
from __future__ import annotations

import argparse
import os
import sys

from dpt_scale import console
from dpt_scale.cli import data, shards, stages, submit  # noqa: F401  (importing registers their commands)
from dpt_scale.cli.registry import COMMANDS, Parser


def build_parser() -> argparse.ArgumentParser:
    # -q works before or after the subcommand: every parser knows it, the innermost given wins.
    quiet = Parser(add_help=False)
    quiet.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                       help="print only warnings and errors")
    parser = Parser(prog="dpt-scale", description="Dual Pseudo Training at scale.", parents=[quiet])
    top = parser.add_subparsers(dest="command", required=True, parser_class=Parser, metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for name, cmd in COMMANDS.items():
        group, _, sub = name.partition(" ")
        if sub:
            if group not in groups:
                groups[group] = top.add_parser(group, help=f"{group} commands").add_subparsers(
                    dest="subcommand", required=True, parser_class=Parser, metavar="SUBCOMMAND")
            p = groups[group].add_parser(sub, help=cmd.help, description=cmd.help, parents=[quiet])
        else:
            p = top.add_parser(name, help=cmd.help, description=cmd.help, parents=[quiet])
        cmd.arguments(p)
        p.set_defaults(run=cmd.run)
    return parser


def _drop_local_rank(argv: list[str]) -> list[str]:
    """The `deepspeed` launcher appends --local_rank=N; LOCAL_RANK in the environment says the same."""
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
        elif arg.split("=", 1)[0] in ("--local_rank", "--local-rank"):
            skip = "=" not in arg  # the value may come as the next argument
            value = arg.split("=", 1)[1] if "=" in arg else argv[i + 1]
            os.environ.setdefault("LOCAL_RANK", value)
        else:
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(_drop_local_rank(sys.argv[1:] if argv is None else argv))
    console.setup_logging(getattr(args, "quiet", False))
    try:
        code = args.run(args) or 0
        from dpt_scale.distributed import leave_process_group

        leave_process_group()
        return code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `dpt-scale shards ls DIR | head`: the reader left, nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 1
    except Exception as exc:
        explained = console.explain(exc)
        if explained is None:
            raise
        print(f"error: {explained[1]}", file=sys.stderr)
        return explained[0]
