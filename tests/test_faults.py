"""Faults a cluster job meets: a full disk and a rank that dies. The full-matrix version, with a real
full disk (tmpfs) and five kills per command, is bench/faults.py; here a file-size limit stands in
for the full disk, since CI cannot mount one."""
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dpt_scale.shards.manifest import Manifest
from helpers import REPO, assert_one_line_error, make_shard_set


def limited(max_bytes: int):
    """preexec_fn: no file may grow past max_bytes (writes fail with EFBIG, as on a full disk)."""
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the writer instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))
    return apply


def cli(*args, max_bytes=None, timeout=600, **popen):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "dpt_scale", "-q", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout,
                          preexec_fn=limited(max_bytes) if max_bytes else None, **popen)


def test_a_full_disk_while_importing_is_one_line_and_the_rerun_ends_as_a_clean_import(tmp_path):
    clean, full = tmp_path / "clean", tmp_path / "full"
    assert cli("data", "import", "mnist", "--out", clean).returncode == 0
    for _ in range(3):  # an earlier worker pool hung on this error one time in six; give a hang its chances
        try:
            result = cli("data", "import", "mnist", "--out", full, max_bytes=1_000_000, timeout=60)  # a shard is ~2 MB
        except subprocess.TimeoutExpired:
            pytest.fail("the import hung after the disk filled up instead of stopping with an error")
        assert_one_line_error(result, "File too large", "free space", "run the same command again")
        assert not (full / "train" / "manifest.json").exists()
        assert not list((full / "train").glob("*.tar")), "no shard may appear under its final name half-written"
    assert cli("data", "import", "mnist", "--out", full).returncode == 0
    for split in ("train", "val"):
        assert [s.sha256 for s in Manifest.load(full / split).shards] == \
            [s.sha256 for s in Manifest.load(clean / split).shards]
    assert not list(full.rglob("*.tmp"))


def children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (from /proc/*/stat: this kernel has no /proc/PID/task/*/children)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:  # it ended meanwhile
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def test_an_import_worker_that_dies_is_one_line_and_the_rerun_ends_as_a_clean_import(tmp_path):
    """As when the OOM killer takes a worker: one line, not a traceback, and not a hang (a
    multiprocessing.Pool, which the importer once used, would wait for the lost group forever)."""
    out = tmp_path / "data"
    command = [sys.executable, "-m", "dpt_scale", "-q", "data", "import", "mnist", "--out", str(out), "--workers", "2"]
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def forks() -> list[int]:  # pool workers are forks: the same command line as the main process
        found = []
        for pid in children(proc.pid):
            try:  # (read now: right after Popen it can still be the command line of the fork)
                if Path(f"/proc/{pid}/cmdline").read_bytes() == Path(f"/proc/{proc.pid}/cmdline").read_bytes():
                    found.append(pid)
            except OSError:
                pass
        return found

    deadline, victim = time.time() + 120, None
    while victim is None and time.time() < deadline and proc.poll() is None:
        # Both workers, and still forks a moment later: a library's fork-then-exec (ldconfig and
        # the like) also shows the same command line, for an instant.
        if len(found := forks()) == 2:
            time.sleep(0.02)
            victim = found[0] if found[0] in forks() else None
        time.sleep(0.005)
    assert victim is not None, f"no import worker was seen (exit {proc.poll()}, {time.time() - deadline + 120:.1f} s)"
    os.kill(victim, signal.SIGKILL)
    try:
        stdout, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the import hung after a worker died")
    assert_one_line_error(subprocess.CompletedProcess(command, proc.returncode, stdout, stderr),
                          "a worker process died", "run the same command again")
    assert not (out / "train" / "manifest.json").exists()
    assert cli("data", "import", "mnist", "--out", out).returncode == 0
    assert Manifest.load(out / "train").num_samples == 10_000
    assert not list(out.rglob("*.tmp"))


def tiny_recipe(tmp_path, **train):
    make_shard_set(tmp_path / "data" / "train", [60, 60, 60, 60])
    body = {"name": "faults", "out": str(tmp_path / "run"), "seed": 0, "data": {"root": str(tmp_path / "data")},
            "diffusion": {"model": {"size": "tiny", "patch_size": 2}, "labels": "ground_truth",
                          "train": {"steps": 200, "micro_batch": 8, "log_every": 1, "sample_every": 0, **train}}}
    path = tmp_path / "faults.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def test_a_checkpoint_that_cannot_be_written_is_one_line_and_training_resumes(tmp_path):
    path = tiny_recipe(tmp_path, steps=6, checkpoint_every=3)
    result = cli("train-diffusion", path, max_bytes=20_000)  # the optimizer state alone is larger
    assert_one_line_error(result, "could not finish writing", "free space", "run the same command again")
    assert cli("train-diffusion", path).returncode == 0
    assert (tmp_path / "run" / "diffusion" / "weights.pt").is_file()


@pytest.mark.timeout(300)
def test_a_rank_that_dies_stops_the_other_with_one_line_within_seconds(tmp_path):
    """Ranks started one process each, as SLURM does: nothing but the process group links them."""
    path = tiny_recipe(tmp_path)
    port = str(__import__("helpers").free_port())
    ranks = [subprocess.Popen([sys.executable, "-m", "dpt_scale", "-q", "train-diffusion", str(path)], cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port, PYTHONUNBUFFERED="1"))
             for r in range(2)]
    metrics = tmp_path / "run" / "diffusion" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.1)
    assert ranks[0].poll() is None, ranks[0].stderr.read()
    ranks[1].kill()
    killed = time.time()
    _, stderr = ranks[0].communicate(timeout=120)
    assert time.time() - killed < 60
    error = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert ranks[0].returncode not in (0, None) and "Traceback" not in stderr, stderr[-2000:]
    assert len(error) == 1 and "lost contact with another rank" in error[0] and "resumes" in error[0], stderr[-2000:]


def test_a_damaged_shard_under_skip_still_yields_every_labelled_image_or_a_clear_error(tmp_path, caplog):
    from dpt_scale.data.labelled import LabelledBank
    from dpt_scale.errors import ShardError

    shards = make_shard_set(tmp_path / "set", [20, 20])
    first = sorted(shards.glob("*.tar"))[0]
    first.write_bytes(first.read_bytes()[: first.stat().st_size // 2])  # s00000..s00019 live here
    early, late = tmp_path / "early.txt", tmp_path / "late.txt"
    early.write_text("s00001\ns00025\n")  # before the cut, and in the intact shard
    late.write_text("s00001\ns00019\n")  # s00019 is past the cut
    with pytest.raises(ShardError, match=first.name):
        LabelledBank.from_subset(shards, early)  # on_corrupt=error: the damage stops it
    bank = LabelledBank.from_subset(shards, early, on_corrupt="skip")
    assert bank.keys == ["s00001", "s00025"] and "damaged shard" in caplog.text
    with pytest.raises(ShardError, match="labelled image.*damaged"):
        LabelledBank.from_subset(shards, late, on_corrupt="skip")
