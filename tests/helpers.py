"""Small builders shared by the tests: real PNG shards in temporary folders, and CLI runs."""
from __future__ import annotations

import io
import json
import os
import select
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from dpt_scale.recipe.schema import Loader
from dpt_scale.shards.writer import ShardSetWriter

REPO = Path(__file__).resolve().parents[1]


def png(value: int, size: int = 8, channels: int = 1) -> bytes:
    """A small PNG whose pixels encode `value` (so a test can tell images apart after decoding)."""
    rng = np.random.default_rng(value)
    shape = (size, size) if channels == 1 else (size, size, 3)
    array = rng.integers(0, 256, shape, dtype=np.uint8)
    array.flat[0] = value % 256
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def jpeg(value: int, size: int, mode: str = "RGB") -> bytes:
    """A JPEG of random pixels seeded by `value`, saved in colour mode `mode` (RGB, L, CMYK)."""
    rng = np.random.default_rng(value)
    image = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_shard_set(directory: Path, shard_sizes: list[int], num_classes: int = 4, size: int = 8, channels: int = 1):
    """Shards with exactly the given sample counts; sample i has key s{i:05d} and class i % classes."""
    classes = [f"c{c}" for c in range(num_classes)]
    i = 0
    with ShardSetWriter(directory, classes=classes, prefix="part", max_samples=10**9) as writer:
        for n in shard_sizes:
            for _ in range(n):
                writer.write({"__key__": f"s{i:05d}", "png": png(i, size, channels), "cls": i % num_classes},
                             (channels, size, size))
                i += 1
            writer.end_shard()
    return directory


def loader_settings(workers: int = 0, streams: int = 1, **rest) -> Loader:
    """A recipe's `data.loader` for tests: in-process and one stream unless a test asks for more."""
    return Loader(workers=workers, streams=streams, **rest)


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    """`dpt-scale ARGS` in a process of its own, as a user runs it: forked from an interpreter that
    has the heavy imports done (cli_server.py), or a fresh one with DPT_TESTS_FRESH_INTERPRETERS=1."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "dpt_scale", *map(str, args)]
    if os.environ.get("DPT_TESTS_FRESH_INTERPRETERS"):
        return subprocess.run(command, cwd=cwd or REPO, env=env, capture_output=True, text=True, timeout=timeout)
    with tempfile.TemporaryDirectory() as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        status = _CLI.run({"args": command[3:], "cwd": str(cwd or REPO), "env": env, "stdout": str(out),
                           "stderr": str(err)}, timeout)
        if status is None:
            raise subprocess.TimeoutExpired(command, timeout, out.read_text(), err.read_text())
        return subprocess.CompletedProcess(command, status, out.read_text(), err.read_text())


class _CliServer:
    """The client of cli_server.py: one server per test process, started on first use."""

    def __init__(self):
        self.process, self.buffer = None, b""

    def run(self, request: dict, timeout: float) -> int | None:
        """The command's exit status; None when it ran past `timeout` (its processes are killed)."""
        if self.process is None or self.process.poll() is not None:
            self.process = subprocess.Popen([sys.executable, str(Path(__file__).with_name("cli_server.py"))],
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO,
                                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
            self.buffer = b""
        self.process.stdin.write(json.dumps(request).encode() + b"\n")
        self.process.stdin.flush()
        pid, status = self._reply(None)["pid"], None
        try:
            status = self._reply(timeout)
            return None if status is None else status["status"]
        finally:
            if status is None:  # timed out, or the test was interrupted: the command and the server go
                kill_tree(pid)
                self.process.kill()
                self.process.wait()
                self.process = None

    def _reply(self, timeout: float | None) -> dict | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and (left <= 0 or not select.select([self.process.stdout], [], [], left)[0]):
                return None
            chunk = os.read(self.process.stdout.fileno(), 1 << 16)
            if not chunk:
                raise RuntimeError("the test CLI server (tests/cli_server.py) exited")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return json.loads(line)


_CLI = _CliServer()


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """A user error: non-zero exit, no traceback, one line on stderr containing every fragment."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(*args: str, nproc: int = 2) -> list[str]:
    """`python -m torch.distributed.run` on a free local port; args: a script, or -m MODULE ..."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *map(str, args)]


def torchrun(*args: str, nproc: int = 2, timeout: int = 240, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    result = subprocess.run(torchrun_command(*args, nproc=nproc), env=env, capture_output=True, text=True,
                            timeout=timeout)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every process under it, as a crash of the node would. (torchrun starts
    each rank in a session of its own: killing the launcher's process group leaves the ranks running.)"""
    import psutil

    try:
        parent = psutil.Process(pid)
        processes = [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for process in processes:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(processes, timeout=30)
