"""The fault-injection matrix: SIGKILL at seeded random points, a shard truncated mid-read, a full
disk, a rank that dies. Every row is a real run of the CLI on the smoke recipe, compared with one
uninterrupted reference run.

    python bench/faults.py [--points 5] [--seed 0] [--work DIR] [--json FILE] [--only NAME ...]

Kills: each long-running command restarts after every kill and must end as the reference did —
the same fp32 losses at every step (each step logged exactly once: nothing lost, nothing repeated),
the same weights, byte-identical pseudo-label sidecars and sampler shards. A kill lands once the
command's own progress (logged steps, finished shards) reaches a seeded random target, plus a
seeded random delay so that some land mid-step or mid-write; `run`'s progress is the sum of its
stages' (one unit for a stage without steps or shards), so its kills fall in any stage, mostly the
long ones. The full-disk rows mount a small tmpfs (root only;
reported as skipped otherwise). Prints the matrix as markdown for docs/reliability.md; about 10
minutes on 2 quiet cores.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "recipes" / "mnist-smoke.yaml"
# Finer logging, checkpoints and shards than the smoke recipe, so that kills have many places to land.
OVERRIDES = ("data.shard_samples=250", "classifier.train.log_every=1", "classifier.train.checkpoint_every=10",
             "diffusion.train.log_every=1", "diffusion.train.checkpoint_every=20", "sample.shard_samples=10",
             "sample.batch=10", "sample.per_class=30")
ENV = dict(os.environ, OMP_NUM_THREADS="2", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")


def cli(*args, out: Path, sets=(), log: Path | None = None, env=None) -> subprocess.Popen:
    flags = [x for s in (*OVERRIDES, f"out={out}", *sets) for x in ("--set", s)]
    command = [sys.executable, "-m", "dpt_scale", "-q", *args, str(SMOKE), *flags]
    stream = open(log, "ab") if log else subprocess.DEVNULL
    return subprocess.Popen(command, cwd=REPO, env=env or ENV, stdout=stream, stderr=stream, start_new_session=True)


def finish(process: subprocess.Popen, what: str, timeout: float = 1200) -> None:
    if process.wait(timeout) != 0:
        raise SystemExit(f"{what} failed (exit {process.returncode}); see its log")


# --- what a command has done so far -----------------------------------------------------------

def logged_steps(run: Path, since: float = 0.0) -> list[dict]:
    """Steps in metrics.jsonl; none until this attempt has rewritten the file (resume trims it)."""
    path = run / "metrics.jsonl"
    if not path.is_file() or path.stat().st_mtime < since:
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def finished_files(folder: Path, pattern: str) -> int:
    return len(list(folder.glob(pattern))) if folder.is_dir() else 0


# --- what must be equal to the reference ------------------------------------------------------

def same_losses(a: Path, b: Path) -> str | None:
    ours, theirs = logged_steps(a), logged_steps(b)
    steps = [row["step"] for row in ours]
    if steps != sorted(set(steps)) or steps != [row["step"] for row in theirs]:
        return f"{a.name}: steps logged {len(steps)} (unique {len(set(steps))}) vs {len(theirs)}"
    if [row["loss"] for row in ours] != [row["loss"] for row in theirs]:
        return f"{a.name}: losses differ"
    return None


def same_weights(a: Path, b: Path) -> str | None:
    ours, theirs = (torch.load(p / "weights.pt", map_location="cpu", weights_only=False) for p in (a, b))
    for part in ("weights", "ema"):
        if ours[part].keys() != theirs[part].keys() or \
                any(not torch.equal(ours[part][k], theirs[part][k]) for k in ours[part]):
            return f"{a.name}/weights.pt: {part} differs"
    return None if ours["step"] == theirs["step"] else f"{a.name}/weights.pt: step differs"


def same_files(a: Path, b: Path, pattern: str) -> str | None:
    names = sorted(p.name for p in a.glob(pattern))
    if names != sorted(p.name for p in b.glob(pattern)) or not names:
        return f"{a.name}: {len(names)} files vs {len(list(b.glob(pattern)))}"
    differ = [n for n in names if (a / n).read_bytes() != (b / n).read_bytes()]
    return f"{a.name}: {len(differ)} of {len(names)} files differ" if differ else None


def leftovers(out: Path) -> str | None:
    stray = [p for p in out.rglob("*.tmp")] if out.is_dir() else []
    return f"{len(stray)} temporary files left, e.g. {stray[0]}" if stray else None


def training(name: str):
    return lambda out, ref: same_losses(out / name, ref / name) or same_weights(out / name, ref / name)


def sampler_shards(out: Path, ref: Path) -> str | None:
    return same_files(out / "samples", ref / "samples", "*.tar")


def pipeline(out: Path, ref: Path) -> str | None:
    headline = [json.loads((o / "report.json").read_text())["headline"] for o in (out, ref)]
    return (sampler_shards(out, ref) or training("classifier")(out, ref) or training("diffusion")(out, ref)
            or training("retrain")(out, ref)
            or same_files(out / "pseudo_labels", ref / "pseudo_labels", "*.labels.json")
            or (None if headline[0] == headline[1] else "report headline differs"))


# command: (its output folders, progress probe (out, attempt start) -> units done, check against the reference)
COMMANDS = {
    "train-classifier": (["classifier"], lambda o, t: len(logged_steps(o / "classifier", t)), training("classifier")),
    "pseudo-label": (["pseudo_labels"], lambda o, t: finished_files(o / "pseudo_labels", "*.labels.json"),
                     lambda o, r: same_files(o / "pseudo_labels", r / "pseudo_labels", "*.labels.json")),
    "train-diffusion": (["diffusion"], lambda o, t: len(logged_steps(o / "diffusion", t)), training("diffusion")),
    "sample": (["samples"], lambda o, t: finished_files(o / "samples", "*.tar"), sampler_shards),
}
RETRAIN = lambda o, t: len(logged_steps(o / "retrain", t))  # noqa: E731


def done_stages(out: Path) -> list[str]:
    markers = [json.loads(p.read_text()) for p in (out / "stages").glob("*.json")] if (out / "stages").is_dir() else []
    return [m["stage"] for m in markers if m.get("state") == "done"]


def run_progress(out: Path, since: float) -> int:
    """`run`'s progress: the units (steps, shards, or 1) of every finished stage plus the running one's."""
    from dpt_scale.pipeline.stages import PIPELINE

    done, total = set(done_stages(out)), 0
    for stage in PIPELINE:
        probe = COMMANDS.get(stage, (None, RETRAIN if stage == "retrain" else None))[1]
        if stage in done:
            total += probe(out, 0) if probe else 1
        elif probe:
            return total + probe(out, since)
    return total


COMMANDS["run"] = ([], run_progress, pipeline)


def kill_matrix(name: str, ref: Path, work: Path, points: int, rng: random.Random) -> dict:
    outputs, probe, check = COMMANDS[name]
    out = work / f"kill-{name}"
    if name == "run":
        out.mkdir(parents=True)
    else:  # the reference's inputs, without what this command makes
        shutil.copytree(ref, out)
        for folder in outputs:
            shutil.rmtree(out / folder)
    log = work / f"kill-{name}.log"
    kills = []
    total = probe(ref, 0)
    targets = sorted(rng.sample(range(1, total), points))  # distinct, increasing, inside the reference's total
    for target in targets:
        started = time.time()
        process = cli(*name.split(), out=out, log=log)
        target = max(target, probe(out, started) + 1)  # never re-kill at a point already passed
        while process.poll() is None and probe(out, started) < target:
            time.sleep(0.05)
        time.sleep(rng.uniform(0, 0.3))
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            at = probe(out, started) if name != "run" else _stage_in_progress(out)
            kills.append({"after_s": round(time.time() - started, 1), "progress": at})
        else:
            kills.append({"after_s": round(time.time() - started, 1), "progress": "finished before the kill"})
    started = time.time()
    finish(cli(*name.split(), out=out, log=log), f"{name} after the kills")
    problem = check(out, ref) or leftovers(out)
    return {"fault": f"SIGKILL x{points}", "command": name, "kills": kills, "resume_s": round(time.time() - started, 1),
            "pass": problem is None and all(k["progress"] != "finished before the kill" for k in kills),
            "detail": problem or "identical to the uninterrupted run"}


def _stage_in_progress(out: Path) -> str:
    from dpt_scale.pipeline.stages import PIPELINE

    done = set(done_stages(out))
    return next((s for s in PIPELINE if s not in done and s != "encode"), "all done")


def one_line_error(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.startswith("error:")]
    return lines[-1] if lines else "(no error line)"


def truncated_shard(ref: Path, work: Path) -> list[dict]:
    """A training shard cut in the middle of a member, read by stage 1 under both policies."""
    rows = []
    for policy in ("error", "skip"):
        out = work / f"truncated-{policy}"
        shutil.copytree(ref / "data", out / "data")
        shutil.copy(ref / "labelled.txt", out / "labelled.txt")
        shard = sorted((out / "data" / "train").glob("*.tar"))[3]
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2 + 300])
        log = work / f"truncated-{policy}.log"
        started = time.time()
        code = cli("train-classifier", out=out, sets=[f"data.loader.on_corrupt={policy}"], log=log).wait(1200)
        seconds = round(time.time() - started, 1)
        text = log.read_text(errors="replace")
        if policy == "error":
            message = one_line_error(log)
            ok = code != 0 and shard.name in message and "Traceback" not in text
        else:
            warned = [line for line in text.splitlines() if "damaged sample" in line]
            message = warned[0] if warned else "(no warning)"
            ok = code == 0 and bool(warned) and (out / "classifier" / "weights.pt").is_file()
        rows.append({"fault": f"shard truncated mid-member, on_corrupt={policy}", "command": "train-classifier",
                     "pass": ok, "detail": f"exit {code} after {seconds} s: {message}"})
    return rows


class Tmpfs:
    """A small RAM disk: writes past `size` fail with ENOSPC, as on a full disk."""

    def __init__(self, path: Path, size: str):
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)

    def grow(self, size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(self.path)], check=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        subprocess.run(["umount", str(self.path)], check=False)


def full_disk(ref: Path, work: Path) -> list[dict]:
    """Import, stage 1 (checkpoints) and the sampler on a disk that fills up part-way; then the disk
    grows and the same command runs again: it must end exactly as the reference run did."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        return [{"fault": "full disk", "command": "-", "pass": None, "detail": "skipped: mounting a tmpfs needs root"}]
    shards = lambda folder: lambda out, ref: same_files(out / folder, ref / folder, "*.tar")  # noqa: E731
    cases = [  # command, what must match the reference, files in place first, extra recipe keys, disk size
        ("data import", lambda o, r: shards("data/train")(o, r) or shards("data/val")(o, r), [], [], "2m"),
        ("train-classifier", training("classifier"), ["labelled.txt"], [f"data.root={ref / 'data'}"], "3m"),
        ("sample", shards("samples"), [], [f"data.root={ref / 'data'}",
                                           f"sample.checkpoint={ref / 'diffusion' / 'weights.pt'}"], "60k"),
    ]
    rows = []
    for command, check, inputs, sets, size in cases:
        with Tmpfs(work / f"disk-{command.split()[-1]}", size) as disk:
            out = disk.path / "run"
            out.mkdir()
            for name in inputs:
                shutil.copy(ref / name, out / name)
            log = work / f"disk-{command.split()[-1]}.log"
            args = ["data", "import", "mnist", "--out", str(out / "data")] if command == "data import" else [command]
            first = _run_plain(args, out, sets, log)
            message = one_line_error(log)
            disk.grow("256m")
            second = _run_plain(args, out, sets, log)
            problem = check(out, ref) or leftovers(out)
            full = "No space left" in message or "disk is full" in message
            ok = first != 0 and full and second == 0 and problem is None \
                and "Traceback" not in log.read_text(errors="replace")
            rows.append({"fault": f"disk full ({size})", "command": command, "pass": ok,
                         "detail": f"exit {first}: {message}; after freeing space: exit {second}, "
                                   f"{problem or 'identical to the uninterrupted run'}"})
    return rows


def _run_plain(args: list[str], out: Path, sets, log: Path) -> int:
    if args[0] == "data":  # `data import` takes the recipe as a flag
        command = [sys.executable, "-m", "dpt_scale", "-q", *args, "--recipe", str(SMOKE), "--set", OVERRIDES[0]]
        with open(log, "ab") as stream:
            return subprocess.run(command, cwd=REPO, env=ENV, stdout=stream, stderr=stream).returncode
    return cli(*args, out=out, sets=sets, log=log).wait(1200)


def dead_rank(ref: Path, work: Path) -> list[dict]:
    """Two ranks train stage 2; rank 1 is SIGKILLed after 10 steps. Launched as SLURM/submitit does
    (each rank its own process, nothing watching them) and under torchrun (whose agent watches)."""
    rows = []
    for launcher in ("one process per rank", "torchrun"):
        out = work / f"dead-rank-{launcher.split()[0]}"
        for name in ("data", "pseudo_labels", "labelled.txt"):
            (shutil.copytree if (ref / name).is_dir() else shutil.copy)(ref / name, out / name)
        log = work / f"dead-rank-{launcher.split()[0]}.log"
        port = str(_free_port())
        flags = [x for s in (*OVERRIDES, f"out={out}") for x in ("--set", s)]
        args = ["-m", "dpt_scale", "-q", "train-diffusion", str(SMOKE), *flags]
        if launcher == "torchrun":
            ranks = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                       "--master_addr", "127.0.0.1", "--master_port", port, *args], cwd=REPO,
                                      env=ENV, stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                                      start_new_session=True)]
        else:
            ranks = [subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=open(log, "ab"),
                                      stderr=subprocess.STDOUT, start_new_session=True,
                                      env=dict(ENV, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                                               MASTER_ADDR="127.0.0.1", MASTER_PORT=port)) for r in range(2)]
        while len(logged_steps(out / "diffusion")) < 10 and ranks[0].poll() is None:
            time.sleep(0.1)
        victim = ranks[1].pid if len(ranks) == 2 else _rank_pid(ranks[0].pid, rank=1)
        os.kill(victim, signal.SIGKILL)
        killed = time.time()
        try:
            code = ranks[0].wait(300)
        except subprocess.TimeoutExpired:  # torchrun's ranks have sessions of their own: kill each one
            import psutil

            for process in [psutil.Process(ranks[0].pid), *psutil.Process(ranks[0].pid).children(recursive=True)]:
                process.kill()
            code = None
        seconds = round(time.time() - killed, 1)
        message = one_line_error(log) if launcher != "torchrun" else _torchrun_summary(log)
        rows.append({"fault": f"rank 1 of 2 SIGKILLed ({launcher})", "command": "train-diffusion",
                     "pass": code not in (0, None) and seconds < 60, "detail": f"rank 0 / the launcher exited "
                     f"{code} {seconds} s after the kill: {message}"})
    return rows


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_pid(launcher: int, rank: int) -> int:
    """The pid of torchrun's worker with RANK=rank, found through /proc."""
    for child in Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split():
        environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return int(child)
    raise SystemExit(f"no rank {rank} under torchrun pid {launcher}")


def _torchrun_summary(log: Path) -> str:
    lines = log.read_text(errors="replace").splitlines()
    return next((line.strip() for line in lines if "exitcode" in line), one_line_error(log))


def markdown(rows: list[dict]) -> str:
    table = ["| fault | command | kill points (progress at kill) | result | detail |",
             "| --- | --- | --- | --- | --- |"]
    for row in rows:
        points = ", ".join(str(k["progress"]) for k in row.get("kills", [])) or "—"
        result = {True: "pass", False: "**FAIL**", None: "skipped"}[row["pass"]]
        table.append(f"| {row['fault']} | `{row['command']}` | {points} | {result} | {row['detail']} |")
    return "\n".join(table)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=5, help="SIGKILLs per command")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("/tmp/dpt-faults"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--only", nargs="+", choices=[*COMMANDS, "truncated", "disk", "rank"])
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    ref = args.work / "reference"
    started = time.time()
    finish(cli("run", out=ref, log=args.work / "reference.log"), "the reference run")
    ref_seconds = time.time() - started
    print(f"reference run: {ref_seconds:.0f} s", flush=True)
    rng = random.Random(args.seed)
    chosen = args.only or [*COMMANDS, "truncated", "disk", "rank"]
    rows = []
    for name in chosen:
        if name in COMMANDS:
            rows.append(kill_matrix(name, ref, args.work, args.points, rng))
        else:
            rows += {"truncated": truncated_shard, "disk": full_disk, "rank": dead_rank}[name](ref, args.work)
        print(markdown(rows[-1:]).splitlines()[-1], flush=True)
    print(f"\nMachine: {json.dumps(machine())}\n\n{markdown(rows)}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "seed": args.seed, "rows": rows}, indent=1))
    return 0 if all(row["pass"] is not False for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
