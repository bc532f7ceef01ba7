"""`dpt-scale submit` and the launchers: the sbatch script (dry run), submitit jobs of 2 tasks on a
real tiny `train-diffusion`, preemption (checkpoint, requeue, resume, the same losses), one-line
errors, the local torchrun launcher. There is no SLURM here: submitit's LocalExecutor runs the same
job function, with each task's rank from submitit's job environment."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import submitit
import torch
import yaml

from dpt_scale import preemption
from dpt_scale.cli import main
from dpt_scale.stage_job import StageJob
from helpers import REPO, assert_one_line_error, free_port, make_shard_set, run_cli

STEPS = 16


@pytest.fixture(scope="module")
def tiny_recipe(tmp_path_factory) -> Path:
    """A tiny U-ViT on 200 8x8 images, 16 fp32 steps, a checkpoint every 4."""
    root = tmp_path_factory.mktemp("submit")
    make_shard_set(root / "data" / "train", [50, 60, 40, 50])
    body = {"name": "tiny", "out": str(root / "run"), "seed": 0,
            "data": {"root": str(root / "data"), "loader": {"workers": 2, "streams": 2}},
            "diffusion": {"model": {"size": "tiny", "patch_size": 2}, "labels": "ground_truth",
                          "train": {"steps": STEPS, "micro_batch": 8, "checkpoint_every": 4, "log_every": 1,
                                    "sample_every": 0, "zero_stage": 2, "precision": "fp32"}}}
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def losses(out: Path) -> dict:
    lines = (out / "diffusion" / "metrics.jsonl").read_text().splitlines()
    return {json.loads(line)["step"]: json.loads(line)["loss"] for line in lines if line.strip()}


def submit_local(folder: Path, job: StageJob):
    """The job in 2 tasks on this machine, as SLURM would run it on a node with 2 GPUs."""
    executor = submitit.LocalExecutor(folder)
    executor.update_parameters(tasks_per_node=2, timeout_min=10, setup=[f"export MASTER_PORT={free_port()}"])
    return executor.submit(job)


@pytest.fixture(scope="module")
def uninterrupted(tiny_recipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "run"
    job = submit_local(out.parent / "slurm", StageJob("train-diffusion", str(tiny_recipe), [f"out={out}"]))
    return job, out


# ---------------------------------------------------------------- the command

def test_dry_run_prints_the_sbatch_script_without_sbatch(tiny_recipe, tmp_path):
    env = dict(os.environ, PATH=str(Path(sys.executable).parent))  # no sbatch, srun or scontrol
    folder = tmp_path / "logs"
    result = subprocess.run(
        [sys.executable, "-m", "dpt_scale", "submit", str(tiny_recipe), "--stage", "train-diffusion", "--nodes", "2",
         "--gpus-per-node", "4", "--partition", "gpu", "--timeout-min", "90", "--set", "diffusion.train.steps=7",
         "--account", "lab", "--slurm", "mail-type=END", "--setup", "module load cuda", "--folder", str(folder),
         "--dry-run"], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    script = result.stdout
    assert script.startswith("#!/bin/bash\n")
    for line in ["#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --partition=gpu", "#SBATCH --time=90", "#SBATCH --signal=USR2@120",
                 "#SBATCH --account=lab", "#SBATCH --mail-type=END", "#SBATCH --cpus-per-task=3",
                 "#SBATCH --job-name=dpt-tiny-train-diffusion", f"#SBATCH --output={folder}/%j_0_log.out",
                 "module load cuda"]:
        assert line in script.splitlines(), line
    command = script.strip().splitlines()[-1]
    assert command.startswith("srun ") and command.endswith(f"-m submitit.core._submit {folder}")
    # what each task runs is in the job's pickle; the note says it
    assert f"dpt-scale train-diffusion {tiny_recipe} --set diffusion.train.steps=7 in each of 8 tasks (2 nodes)" \
        in result.stderr
    assert not folder.exists()  # nothing written, nothing submitted

    cpu = run_cli("submit", str(tiny_recipe), "--stage", "sample", "--gpus-per-node", "0", "--tasks-per-node", "2",
                  "--dry-run", "-q")
    assert cpu.returncode == 0 and cpu.stderr == "", cpu.stderr
    assert "#SBATCH --ntasks-per-node=2" in cpu.stdout and "gpus" not in cpu.stdout


def test_bad_submissions_are_one_line_errors(tiny_recipe, tmp_path, capsys):
    recipe = str(tiny_recipe)
    assert_one_line_error(run_cli("submit", str(tmp_path / "missing.yaml"), "--stage", "sample"), "recipe not found")
    assert_one_line_error(run_cli("submit", recipe, "--stage", "sample"),  # no SLURM on this machine
                          "sbatch and srun not found", "--dry-run")
    cases = [  # the same main() in this process: a fresh interpreter per case costs 3 s of imports
        (["--stage", "train-everything"], ["unknown stage 'train-everything'", "train-diffusion, sample"]),
        (["--stage", "sample", "--nodes", "0"], ["--nodes 0 is impossible; give at least 1"]),
        (["--stage", "sample", "--gpus-per-node", "-1"], ["--gpus-per-node -1 is impossible; give at least 0"]),
        (["--stage", "sample", "--mem-gb", "0"], ["--mem-gb 0 is impossible"]),
        (["--stage", "sample", "--timeout-min", "2"], ["--signal-delay-s 120 leaves no time"]),
        (["--stage", "sample", "--set", "diffusion.train.stepz=3"], ["stepz"]),
        (["--stage", "sample", "--slurm", "=x"], ["--slurm '=x' names no option"]),
        (["--stage", "sample", "--stage-args=--from sample"], ["unrecognized arguments: --from sample"]),
    ]
    for args, fragments in cases:
        try:
            status = main(["submit", recipe, "--dry-run", *args])
        except SystemExit as exc:  # argparse's errors
            status = exc.code
        out, err = capsys.readouterr()
        assert status == 2 and out == "", out
        assert_one_line_error(subprocess.CompletedProcess(args, status, out, err), *fragments)


# ---------------------------------------------------------------- jobs (submitit's local executor)

def test_a_two_task_job_trains_with_ranks_from_submitit(uninterrupted):
    job, out = uninterrupted
    assert job.results() == [0, 0], job.stderr()
    assert sorted(losses(out)) == list(range(1, STEPS + 1))
    complete = json.loads((out / "diffusion" / "checkpoints" / f"step-{STEPS:08d}" / "COMPLETE").read_text())
    assert complete["world_size"] == 2
    assert (out / "diffusion" / "weights.pt").is_file()


def test_a_preempted_job_checkpoints_requeues_and_resumes_with_the_same_losses(tiny_recipe, uninterrupted, tmp_path):
    reference_job, reference = uninterrupted
    assert reference_job.results() == [0, 0]
    out = tmp_path / "run"
    job = submit_local(tmp_path / "slurm", StageJob("train-diffusion", str(tiny_recipe), [f"out={out}"]))
    deadline = time.time() + 240
    while not ((out / "diffusion" / "metrics.jsonl").is_file() and max(losses(out), default=0) >= 5):
        assert time.time() < deadline and job.state == "RUNNING", job.stderr()
        time.sleep(0.05)
    # SLURM signals every task of the job; here also the tasks' data workers, which must ignore it.
    # (LocalJob._interrupt() signals submitit's controller process instead, which has no handler
    # for USR2 and dies of it.)
    processes = [p for p in psutil.Process(job._process.pid).children(recursive=True)
                 if "submitit.core._submit" in " ".join(p.cmdline())]
    assert len([p for p in processes if "pt_data_worker" not in p.name()]) == 2
    for process in processes:
        process.send_signal(signal.SIGUSR2)
    assert job.results() == [0, 0], job.stderr()

    log = job.stderr()  # task 0
    stopped = int(re.search(r"stopped at step (\d+) and saved it", log).group(1))
    assert 5 <= stopped < STEPS
    assert "Requeued job" in job.stdout()  # submitit logs its info on stdout
    assert f"resumed from {out}/diffusion/checkpoints/step-{stopped:08d}" in log  # not from step 0
    assert losses(out) == losses(reference)  # every step, bit for bit
    resumed, whole = (torch.load(o / "diffusion" / "weights.pt", weights_only=False) for o in (out, reference))
    for part in ("weights", "ema"):
        assert resumed[part].keys() == whole[part].keys()
        assert all(torch.equal(resumed[part][k], whole[part][k]) for k in whole[part])


class NotSlurm:  # stands for submitit's job environment, which a plain process has not
    def export(self, **kwargs):
        pass


def test_a_job_runs_the_stage_function_with_the_options_of_its_command(tmp_path, monkeypatch, capsys, request):
    from dpt_scale.cli.submit import _options
    from dpt_scale.distributed import leave_process_group
    from dpt_scale.pipeline.markers import read_marker
    from dpt_scale.recipe import load_recipe
    from dpt_scale.stage_job import StageFailed

    smoke = str(REPO / "recipes" / "mnist-smoke.yaml")
    recipe = load_recipe(smoke, [])
    assert _options("run", smoke, ["--until", "subset"], recipe) == {"start": None, "only": None, "until": "subset"}
    assert _options("study", smoke, ["--seeds", "3,4", "--arms", "dpt"], recipe) == \
        {"seeds": [3, 4], "arm_names": ["dpt"], "out": None}
    assert _options("sample", smoke, [], recipe) == {}
    monkeypatch.setattr(submitit.helpers, "TorchDistributedEnvironment", NotSlurm)
    monkeypatch.setattr(preemption, "install", lambda: None)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):  # the job sets them here
        monkeypatch.delenv(name, raising=False)
    request.addfinalizer(leave_process_group)  # and its port, which later tests' launches would inherit
    out = tmp_path / "run"
    StageJob("run", smoke, [f"out={out}"], {"until": "subset"}).run()
    assert [read_marker(load_recipe(smoke, [f"out={out}"]), s)["state"] for s in ("import", "subset")] == \
        ["done", "done"]
    assert read_marker(load_recipe(smoke, [f"out={out}"]), "train-classifier") is None  # --until held
    # A stage the user must fix: its one line in the task's log, no traceback, the job failed.
    with pytest.raises(StageFailed, match="diffusion weights not found"):
        StageJob("sample", smoke, [f"out={out}"])()
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "diffusion weights not found" in errors[0]


def test_a_signal_waits_for_the_step_inside_a_training_loop_and_goes_to_submitit_outside(monkeypatch):
    for name in ("_submitit_handler", "_owner_pid", "_signal", "_requested", "_cooperating"):
        monkeypatch.setattr(preemption, name, getattr(preemption, name))  # restored afterwards
    calls = []  # stands for submitit's handler: checkpoint(), requeue, exit
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))
    try:
        preemption.install()
        os.kill(os.getpid(), signal.SIGUSR2)  # e.g. while sampling: submitit requeues at once
        assert calls == [signal.SIGUSR2]
        with preemption.stop_points():
            os.kill(os.getpid(), signal.SIGUSR2)
            assert calls == [signal.SIGUSR2]  # only noted: the loop saves at the end of its step
        assert calls == [signal.SIGUSR2] * 2  # the loop ended without acting on it: handed over
        with pytest.raises(preemption.Preempted), preemption.stop_points():
            os.kill(os.getpid(), signal.SIGUSR2)
            raise preemption.Preempted("saved")  # what the Trainer does; the job then hands over
        assert len(calls) == 2
    finally:
        signal.signal(signal.SIGUSR2, previous)


# ---------------------------------------------------------------- launchers

def test_launcher_scripts_are_executable_and_parse():
    scripts = sorted((REPO / "launchers").glob("*/*.sh"))
    assert {s.parent.name for s in scripts} == {"deepspeed", "local", "slurm"}
    for script in scripts:
        assert os.access(script, os.X_OK), script
        assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0, script
        assert (script.parent / "README.md").is_file()
    assert (REPO / "launchers" / "deepspeed" / "hostfile.example").is_file()


def test_local_launcher_runs_two_processes(tiny_recipe, uninterrupted, tmp_path):
    _, reference = uninterrupted
    env = dict(os.environ, PYTHON=sys.executable)  # the script finds a free port itself
    result = subprocess.run([str(REPO / "launchers" / "local" / "run.sh"), "2", "train-diffusion", str(tiny_recipe),
                             "--set", f"out={tmp_path}/run", "-q"], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert losses(tmp_path / "run") == losses(reference)  # torchrun or submitit: the same 2-rank run
