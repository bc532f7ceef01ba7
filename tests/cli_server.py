"""`python -m dpt_scale ARGS` for the tests, each run in a fork of this one interpreter, which has
imported torch, torchvision, DeepSpeed, timm and diffusers once: a fresh interpreter spends about
4 s on those imports on the 2-core CI machine, and the tests start a few hundred commands. Each
command is still a process of its own (its own folder, environment, stdout, stderr and exit
status, exiting as `python -m` does), so a test sees what a user sees. This process starts no
thread, so forking it is safe.

One JSON line each way: {"args", "cwd", "env", "stdout", "stderr"} in; {"pid"}, then {"status"} out.
"""
import json
import os
import runpy
import sys

import deepspeed  # noqa: F401
import diffusers  # noqa: F401
import timm  # noqa: F401
import torch  # noqa: F401
import torchvision  # noqa: F401

import dpt_scale.cli  # noqa: F401


def run_command(request: dict) -> None:
    """In the forked child: the command, which ends by raising SystemExit (or another exception,
    which Python prints before exiting with status 1, as it would for `python -m dpt_scale`)."""
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    sys.argv = ["dpt_scale", *request["args"]]
    runpy.run_module("dpt_scale", run_name="__main__", alter_sys=True)


def serve() -> None:
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            run_command(request)
            raise SystemExit(0)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"status": os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == "__main__":
    serve()
