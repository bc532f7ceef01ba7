"""The DeepSpeed engine on CPU: ZeRO 1/2/3, exact resume after SIGKILL, EMA under ZeRO-3, export,
checkpoint damage, launchers. Real runs of `dpt-scale train-diffusion` on a tiny U-ViT."""
import json
import os
import random
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import yaml

from dpt_scale.engine.dsconfig import deepspeed_config
from dpt_scale.errors import UserError
from dpt_scale.recipe.schema import Train
from helpers import assert_one_line_error, kill_tree, make_shard_set, run_cli, torchrun, torchrun_command


def recipe(tmp_path, name="r.yaml", **train):
    """A tiny U-ViT on 200 8x8 images; `train` overrides diffusion.train."""
    if not (tmp_path / "data" / "train").exists():
        make_shard_set(tmp_path / "data" / "train", [50, 60, 40, 50])
    body = {"name": "engine", "out": str(tmp_path / "run"), "seed": 0,
            "data": {"root": str(tmp_path / "data"), "loader": {"workers": 2, "streams": 2}},
            "diffusion": {"model": {"size": "tiny", "patch_size": 2}, "labels": "ground_truth",
                          "train": {"steps": 8, "micro_batch": 8, "checkpoint_every": 4, "log_every": 1,
                                    "sample_every": 0, "zero_stage": 2, **train}}}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(body))
    return path


def losses(run_dir):
    lines = (run_dir / "diffusion" / "metrics.jsonl").read_text().splitlines()
    return {json.loads(l)["step"]: json.loads(l)["loss"] for l in lines}


def train(recipe_path, *sets, nproc=2):
    args = ["-m", "dpt_scale", "-q", "train-diffusion", recipe_path, *[x for s in sets for x in ("--set", s)]]
    return torchrun(*args, nproc=nproc, timeout=300)


# ---------------------------------------------------------------- config (no processes)

def test_batch_arithmetic_is_checked_up_front():
    assert deepspeed_config(Train(micro_batch=8, global_batch=64), 4)["gradient_accumulation_steps"] == 2
    with pytest.raises(UserError, match=r"global_batch 100 != micro_batch 8 x grad_accum \? x 4 ranks; choose a "
                                        r"global_batch that is a multiple of 32"):
        deepspeed_config(Train(micro_batch=8, global_batch=100), 4)
    with pytest.raises(UserError, match="set train.grad_accum to 2"):
        deepspeed_config(Train(micro_batch=8, grad_accum=3, global_batch=64), 4)


def test_config_follows_the_recipe_and_merges_the_passthrough():
    cfg = deepspeed_config(Train(micro_batch=4, grad_accum=2, zero_stage=3, offload="cpu", grad_clip=1.0,
                                 warmup_steps=100, lr_schedule="cosine", steps=1000, precision="fp32",
                                 deepspeed={"zero_optimization": {"stage3_max_live_parameters": 123}}), 2)
    assert cfg["train_batch_size"] == 16 and cfg["gradient_clipping"] == 1.0
    assert cfg["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu"},
                                        "stage3_max_live_parameters": 123}
    assert cfg["scheduler"]["type"] == "WarmupCosineLR" and cfg["scheduler"]["params"]["warmup_num_steps"] == 100
    assert cfg["optimizer"]["params"]["betas"] == [0.99, 0.99] and not cfg["bf16"]["enabled"]
    assert "scheduler" not in deepspeed_config(Train(), 1)  # constant, no warm-up
    with pytest.raises(UserError, match="offload: cpu needs ZeRO stage 1, 2 or 3"):
        deepspeed_config(Train(zero_stage=0, offload="cpu"), 1)


def test_impossible_batch_is_a_one_line_error_from_the_cli(tmp_path):
    result = run_cli("train-diffusion", str(recipe(tmp_path)), "--set", "diffusion.train.global_batch=20")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "error: recipe: 'diffusion.train.global_batch' 20 is not a multiple of micro_batch 8" in \
        result.stderr.splitlines()[-1]


# ---------------------------------------------------------------- real runs

def test_zero_stages_and_launchers_give_identical_fp32_losses(tmp_path):
    path = recipe(tmp_path, steps=6, sample_every=3)  # sampling hooks must not disturb training either
    runs = {}
    for stage in (1, 2, 3):
        train(path, f"out={tmp_path}/z{stage}", f"diffusion.train.zero_stage={stage}")
        runs[f"zero{stage}"] = losses(tmp_path / f"z{stage}")
        assert (tmp_path / f"z{stage}" / "diffusion" / "samples" / "step-00000006.png").is_file()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    subprocess.run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
                    str(__import__("helpers").free_port()), "--module", "dpt_scale", "-q", "train-diffusion",
                    str(path), "--set", f"out={tmp_path}/ds", "--set", "diffusion.train.sample_every=0"],
                   env=env, check=True, capture_output=True, timeout=300)
    runs["deepspeed launcher"] = losses(tmp_path / "ds")
    assert len(runs["zero1"]) == 6
    assert runs["zero2"] == runs["zero1"] and runs["deepspeed launcher"] == runs["zero2"]  # bit for bit
    # ZeRO-3 reduce-scatters gradient partitions, rounding the division and sum in another order
    assert runs["zero3"] == pytest.approx(runs["zero1"], rel=1e-5)


def test_sigkill_and_restart_reproduce_the_uninterrupted_losses(tmp_path):
    path = recipe(tmp_path, steps=12, checkpoint_every=3)
    train(path, f"out={tmp_path}/whole")
    reference = losses(tmp_path / "whole")
    killed = tmp_path / "killed"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    rng = random.Random(7)
    for kill_after in sorted(rng.sample(range(4, 12), 2)):  # two kills, at seeded random steps
        command = torchrun_command("-m", "dpt_scale", "-q", "train-diffusion", path, "--set", f"out={killed}")
        proc = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        metrics = killed / "diffusion" / "metrics.jsonl"
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if metrics.is_file() and max(losses(killed), default=0) >= kill_after:
                break
            time.sleep(0.05)
        kill_tree(proc.pid)  # the launcher and both ranks, mid-training
        proc.wait()
        logged = losses(killed)
        time.sleep(1)
        assert losses(killed) == logged, "a rank outlived the kill and trained on"
    train(path, f"out={killed}")
    assert losses(killed) == reference  # every step, bit for bit


EMA_SCRIPT = textwrap.dedent("""
    import sys, torch, deepspeed
    from dpt_scale.diffusion.loss import denoising_loss
    from dpt_scale.diffusion.schedules import build_schedule
    from dpt_scale.engine.trainer import Trainer
    from dpt_scale.models import build_uvit
    from dpt_scale.recipe.schema import Loader, Train
    from dpt_scale.shards.loader import ShardLoader

    shards, out = sys.argv[1], sys.argv[2]
    settings = dict(size="tiny", img_size=8, patch_size=2, in_chans=1, num_classes=4, attention="sdpa")
    schedule = build_schedule("linear_vp")
    def loss_fn(tr, batch):
        x = batch["image"].float().div(127.5).sub(1)
        return denoising_loss(tr.engine, x, batch["cls"], schedule, 0.1, 4)
    reference = {}
    def whole(tr):  # the whole weights, gathered: what an EMA without DeepSpeed would average
        params = dict(tr.engine.module.named_parameters())
        with deepspeed.zero.GatheredParameters(list(params.values())):
            return {n: p.detach().float().clone() for n, p in params.items()}
    def plain_ema(tr, step):
        for n, w in whole(tr).items():
            reference[n] = 0.9 * reference[n] + 0.1 * w
    cfg = Train(steps=5, micro_batch=4, zero_stage=3, ema_decay=0.9, ema_warmup=False, checkpoint_every=5,
                log_every=1, sample_every=1, precision="fp32")
    tr = Trainer(cfg, out, model_fn=lambda: build_uvit(**settings), loss_fn=loss_fn, hooks=[plain_ema],
                 export_extra={"settings": settings})
    reference.update(whole(tr))
    weights = tr.fit(ShardLoader(shards, 4, rank=tr.rank, world_size=tr.world, settings=Loader(workers=0, streams=2)))
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t, y = torch.tensor([1., 300., 999.]), torch.tensor([0, 3, 4])
    with torch.no_grad():
        engine_out = tr.engine.module.eval()(x, t, y)  # ZeRO-3 gathers the partitions itself
    if tr.rank == 0:
        exported = torch.load(weights, weights_only=False)
        for n, value in reference.items():
            torch.testing.assert_close(exported["ema"][n], value, rtol=1e-6, atol=1e-7)
        plain = build_uvit(**exported["settings"]).eval()
        plain.load_state_dict(exported["weights"])
        with torch.no_grad():
            torch.testing.assert_close(plain(x, t, y), engine_out, rtol=1e-5, atol=1e-6)
        print("EMA and export OK")
""")


def test_ema_under_zero3_and_the_export_match_plain_pytorch(tmp_path):
    make_shard_set(tmp_path / "shards", [30, 30])
    script = tmp_path / "ema.py"
    script.write_text(EMA_SCRIPT)
    result = torchrun(script, tmp_path / "shards", tmp_path / "run", timeout=300)
    assert "EMA and export OK" in result.stdout


def test_an_incomplete_latest_checkpoint_is_reported_and_passed_over(tmp_path):
    path = recipe(tmp_path, steps=6, checkpoint_every=3)
    train(path, nproc=1)
    first = losses(tmp_path / "run")
    checkpoints = tmp_path / "run" / "diffusion" / "checkpoints"
    (checkpoints / "step-00000006" / "COMPLETE").unlink()  # as if killed while saving step 6
    (checkpoints / "step-00000006" / "dpt_rank00000.pt").unlink()
    result = run_cli("train-diffusion", str(path), "--set", "diffusion.train.steps=9")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "checkpoint step-00000006 is incomplete" in result.stderr and "resuming from step-00000003" in result.stderr
    again = losses(tmp_path / "run")
    assert sorted(again) == list(range(1, 10)) and all(again[s] == first[s] for s in range(1, 7))
    assert sorted(p.name for p in checkpoints.glob("step-*")) == ["step-00000006", "step-00000009"]


def test_resuming_with_another_world_size_is_a_clear_error(tmp_path):
    path = recipe(tmp_path, steps=3, checkpoint_every=3)
    train(path, "diffusion.train.steps=2", "diffusion.train.checkpoint_every=2")
    result = run_cli("train-diffusion", str(path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "was written by 2 ranks and this job has 1; resume with 2 ranks" in result.stderr.splitlines()[-1]


def _pseudo_labelled_run(tmp_path, name, hidden, pseudo):
    """A run whose 120 training images carry the hidden labels `hidden` and whose stage-1 output
    says `pseudo` (key -> (label, confidence)); returns its recipe."""
    from dpt_scale.classification.pseudo_labels import write_sidecar
    from dpt_scale.shards.manifest import write_json
    from dpt_scale.shards.writer import ShardSetWriter
    from helpers import png

    data = tmp_path / name / "data" / "train"
    with ShardSetWriter(data, classes=["a", "b", "c", "d"], prefix="train", max_samples=60) as writer:
        for i, c in enumerate(hidden):
            writer.write({"__key__": f"k{i:04d}", "png": png(i), "cls": c}, (1, 8, 8))
    labels_dir = tmp_path / name / "run" / "pseudo_labels"
    labels_dir.mkdir(parents=True)
    for entry, start in zip(writer.manifest.shards, (0, 60)):
        keys = [f"k{i:04d}" for i in range(start, start + entry.samples)]
        probs = torch.zeros(len(keys), 4)
        for row, key in enumerate(keys):
            probs[row, pseudo[key][0]] = pseudo[key][1]
        write_sidecar(labels_dir, entry.name, entry.sha256, "test", keys, probs)
    write_json(labels_dir / "manifest.json", {"shards": [e.name for e in writer.manifest.shards], "counts": [0] * 4,
                                              "selection": {"threshold": 0.5, "top_per_class": 0}})
    path = recipe(tmp_path / name, steps=3, checkpoint_every=3)
    body = yaml.safe_load(path.read_text())
    body["diffusion"]["labels"] = "pseudo"
    path.write_text(yaml.safe_dump(body))
    return path


def test_stage_2_never_reads_hidden_labels_and_follows_the_pseudo_labels(tmp_path):
    """Permuting every hidden label leaves stage 2 bit-identical; shifting the pseudo-labels (or
    dropping them below the selection threshold, to the null class) changes it."""
    rng = random.Random(0)
    hidden = [i % 4 for i in range(120)]
    pseudo = {f"k{i:04d}": (rng.randrange(4), 0.9) for i in range(120)}
    runs = {"base": (hidden, pseudo), "permuted": (rng.sample(hidden, len(hidden)), pseudo),
            "shifted": (hidden, {k: ((c + 1) % 4, 0.9) for k, (c, _) in pseudo.items()}),
            "unselected": (hidden, {k: (c, 0.3) for k, (c, _) in pseudo.items()})}
    for name, (h, p) in runs.items():
        (tmp_path / name).mkdir()
        result = run_cli("-q", "train-diffusion", str(_pseudo_labelled_run(tmp_path, name, h, p)),
                         "--set", "data.loader.workers=0")
        assert result.returncode == 0, result.stderr[-3000:]
    got = {name: losses(tmp_path / name / "run") for name in runs}
    assert got["permuted"] == got["base"]
    assert got["shifted"] != got["base"] and got["unselected"] != got["base"]
    export = torch.load(tmp_path / "base" / "run" / "diffusion" / "weights.pt", weights_only=False)
    assert export["labels"] == "pseudo"


def test_stage_2_without_pseudo_labels_names_the_command(tmp_path):
    path = recipe(tmp_path)
    result = run_cli("-q", "train-diffusion", str(path), "--set", "diffusion.labels=pseudo")
    assert_one_line_error(result, "no finished pseudo-labels", "dpt-scale pseudo-label")
