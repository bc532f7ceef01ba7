"""Small builders shared by the tests: real PNG shards in temporary folders, and CLI runs."""
from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

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


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    """`dpt-scale ARGS` in a fresh interpreter, as a user runs it."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "dpt_scale", *args], cwd=cwd or REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


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
