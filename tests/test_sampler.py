"""Stage 3, the shard sampler: per-image determinism, 1 rank == 2 ranks, byte-identical resume after
SIGKILL, clean-up of a crash's temporaries, and the errors a user can cause. Real runs of
`dpt-scale sample` on a tiny U-ViT trained for two steps on 8x8 images."""
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from dpt_scale.diffusion.sampling import sample as run_solver
from dpt_scale.diffusion.schedules import build_schedule
from dpt_scale.generation.plan import GenerationPlan
from dpt_scale.models import build_uvit
from dpt_scale.shards.decode import decode_image
from dpt_scale.shards.tar import iter_samples
from dpt_scale.shards.verify import verify
from helpers import REPO, assert_one_line_error, make_shard_set, run_cli, torchrun

SAMPLE = {"per_class": 30, "shard_samples": 5, "batch": 3, "steps": 3, "guidance": 1.5}  # 120 images, 24 shards


def write_recipe(path: Path, data: Path, out: Path, **sample) -> Path:
    body = {"name": "sampler", "out": str(out), "seed": 3,
            "data": {"root": str(data), "loader": {"workers": 0, "streams": 2}},
            "diffusion": {"model": {"size": "tiny", "patch_size": 2}, "labels": "ground_truth",
                          "train": {"steps": 2, "micro_batch": 8, "checkpoint_every": 2, "log_every": 1}},
            "sample": {**SAMPLE, **sample}}
    path.write_text(yaml.safe_dump(body))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A two-step U-ViT on 200 8x8 images in 4 classes, and one uninterrupted 1-rank sample set."""
    root = tmp_path_factory.mktemp("sampler")
    make_shard_set(root / "data" / "train", [50, 60, 40, 50])
    recipe = write_recipe(root / "r.yaml", root / "data", root / "run")
    result = run_cli("-q", "train-diffusion", str(recipe))
    assert result.returncode == 0, result.stderr[-3000:]
    result = run_cli("-q", "sample", str(recipe))
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def other_run(trained: Path, name: str, **sample) -> Path:
    """A recipe sampling the fixture's model into another run folder."""
    return write_recipe(trained / f"{name}.yaml", trained / "data", trained / name,
                        checkpoint=str(trained / "run" / "diffusion" / "weights.pt"), **sample)


def contents(samples: Path) -> dict[str, bytes]:
    manifest = json.loads((samples / "manifest.json").read_text())
    manifest["meta"].pop("created")
    return {"manifest": json.dumps(manifest, sort_keys=True).encode(),
            **{p.name: p.read_bytes() for p in sorted(samples.glob("*.tar"))}}


def test_the_set_is_an_ordinary_verified_shard_set(trained):
    samples = trained / "run" / "samples"
    manifest, reports, faults = verify(samples)
    assert not faults
    assert len(manifest.shards) == 24 and manifest.class_histogram == [30, 30, 30, 30]
    assert manifest.image["size"] == [8, 8] and manifest.image["channels"] == 1
    first = next(iter(reports))
    assert first.keys[:2] == ["g000000000", "g000000001"]
    assert not list(samples.rglob("*.tmp"))


def test_an_image_depends_only_on_its_index():
    plan = GenerationPlan(total=100, num_classes=4, seed=1, shard_samples=10, batch=4)
    a_labels, a_noise, _ = plan.draw(range(0, 6), (1, 4, 4))
    b_labels, b_noise, _ = plan.draw(range(3, 9), (1, 4, 4))
    assert torch.equal(a_noise[3:], b_noise[:3]) and torch.equal(a_labels[3:], b_labels[:3])
    assert not torch.equal(a_noise[0], a_noise[1])
    assert [list(r) for r in plan.batches(9)] == [[90, 91, 92, 93], [94, 95, 96, 97], [98, 99]]
    # drawn classes follow the weights (class 2 never; class 0 about three times class 1)
    weighted = GenerationPlan(total=4000, num_classes=3, seed=0, shard_samples=4000, batch=4000,
                              class_weights=(3.0, 1.0, 0.0))
    counts = torch.bincount(weighted.draw(range(4000), (1,))[0], minlength=3)
    assert counts[2] == 0 and 2.7 < counts[0] / counts[1] < 3.3


def test_ancestral_noise_comes_from_each_images_own_generator():
    torch.manual_seed(0)
    model = build_uvit("tiny", img_size=8, patch_size=2, in_chans=1, num_classes=4).eval()
    schedule = build_schedule("linear_vp")
    plan = GenerationPlan(total=8, num_classes=4, seed=5, shard_samples=8, batch=8)

    def images(indices):
        labels, noise, generators = plan.draw(indices, (1, 8, 8))
        return run_solver(model, schedule, labels, (1, 8, 8), 4, 1.5, null_class=4, noise=noise, solver="ddpm",
                          generators=generators)

    together, alone = images(range(0, 4)), images(range(2, 3))
    assert torch.allclose(together[2], alone[0], atol=1e-5)  # same image whatever its batch-mates


def test_two_ranks_write_the_same_bytes_as_one(trained):
    recipe = other_run(trained, "two")
    torchrun("-m", "dpt_scale", "-q", "sample", str(recipe), timeout=300)
    assert contents(trained / "two" / "samples") == contents(trained / "run" / "samples")


def test_sigkill_at_three_random_points_then_resume_is_byte_identical(trained):
    recipe = other_run(trained, "killed")
    samples = trained / "killed" / "samples"
    # One shard's time on this machine, from the uninterrupted run: each kill lands at a random
    # point within the shard after its target, and the targets leave at least 10 of the 24 shards
    # to do, so that a busy machine's slow polling cannot let a run finish before its kill.
    done_at = sorted(p.stat().st_mtime for p in (trained / "run" / "samples" / ".progress").glob("*.json"))
    shard_seconds = (done_at[-1] - done_at[0]) / (len(done_at) - 1)
    rng = random.Random(11)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for target in sorted(rng.sample(range(2, 15), 3)):  # kill once this many shards are done, plus a bit
        proc = subprocess.Popen([os.sys.executable, "-m", "dpt_scale", "-q", "sample", str(recipe)], cwd=REPO,
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while len(list((samples / ".progress").glob("*.json"))) < target and proc.poll() is None:
            assert time.time() < deadline, "the sampler made no progress"
            time.sleep(0.005)
        time.sleep(rng.uniform(0, shard_seconds))
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL, f"the sampler ended before its kill after {target} shards"
        assert not (samples / "manifest.json").exists()  # not finished: no manifest
    (samples / "samples-000023.tar.tmp").write_bytes(b"left by a crash")
    result = run_cli("-q", "sample", str(recipe))
    assert result.returncode == 0, result.stderr[-3000:]
    assert contents(samples) == contents(trained / "run" / "samples")
    assert not list(samples.rglob("*.tmp"))


def test_a_finished_set_is_kept_and_other_settings_are_refused(trained):
    samples = trained / "run" / "samples"
    before = contents(samples)
    recipe = write_recipe(trained / "again.yaml", trained / "data", trained / "run")
    result = run_cli("-q", "sample", str(recipe))
    assert result.returncode == 0 and contents(samples) == before
    recipe = write_recipe(trained / "changed.yaml", trained / "data", trained / "run", steps=4)
    assert_one_line_error(run_cli("-q", "sample", str(recipe)), "holds images of another generation run",
                          "steps", "delete")
    assert contents(samples) == before


def test_a_checkpoint_of_another_model_is_refused(trained):
    recipe = other_run(trained, "mismatch")
    result = run_cli("-q", "sample", str(recipe), "--set", "diffusion.model.patch_size=4")
    assert_one_line_error(result, "does not match the recipe's model", "patch_size=2 (recipe: 4)")
    result = run_cli("-q", "sample", str(recipe), "--set", f"sample.checkpoint={trained / 'missing.pt'}")
    assert_one_line_error(result, "diffusion weights not found", "train-diffusion")
    torch.save({"kind": "classifier"}, trained / "classifier.pt")
    result = run_cli("-q", "sample", str(recipe), "--set", f"sample.checkpoint={trained / 'classifier.pt'}")
    assert_one_line_error(result, "is not a diffusion model export")


def test_n_images_with_drawn_classes_and_a_restart_of_it(trained):
    recipe = other_run(trained, "total", total=12)
    for _ in range(2):  # the second run finds the finished set with the same settings and keeps it
        result = run_cli("-q", "sample", str(recipe))
        assert result.returncode == 0, result.stderr[-3000:]
    manifest, _, faults = verify(trained / "total" / "samples")
    assert not faults and manifest.num_samples == 12 and sum(manifest.class_histogram) == 12


def test_bf16_sampling_is_close_to_fp32_and_its_set_keeps_its_precision(trained):
    """`sample.precision: bf16` runs the U-ViT in bfloat16: the same images up to rounding, and a
    restart in fp32 over a bf16 set (or the other way round) is refused like any other change."""
    recipe = other_run(trained, "bf16", precision="bf16")
    result = run_cli("-q", "sample", str(recipe))
    assert result.returncode == 0, result.stderr[-3000:]
    decoded = {}
    for name in ("run", "bf16"):
        for shard in sorted((trained / name / "samples").glob("*.tar")):
            for s in iter_samples(shard):
                decoded.setdefault(name, {})[s["__key__"]] = decode_image(s["png"], 1).float()
    assert decoded["bf16"].keys() == decoded["run"].keys()
    difference = torch.stack([(decoded["bf16"][k] - decoded["run"][k]).abs().mean() for k in decoded["run"]])
    assert 0 < difference.mean() < 8, difference.mean()  # pixel levels out of 255: rounding, not other images
    assert_one_line_error(run_cli("-q", "sample", str(recipe), "--set", "sample.precision=fp32"),
                          "holds images of another generation run", "precision")
