"""The latent path: `dpt-scale encode` pre-extracts autoencoder moments (with the mirror image's own
moments for flips) into a verified shard set keyed like the images, resumes per shard, and
train-diffusion / sample run on it end to end. A tiny random AutoencoderKL (16x16 RGB -> 4x8x8)."""
import hashlib
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from dpt_scale.diffusion.autoencoder import LatentAutoencoder
from dpt_scale.errors import UserError
from dpt_scale.recipe import load_recipe
from dpt_scale.shards.decode import decode_image
from dpt_scale.shards.loader import ShardLoader
from dpt_scale.shards.manifest import Manifest
from dpt_scale.shards.tar import iter_samples
from dpt_scale.shards.verify import verify
from helpers import assert_one_line_error, loader_settings, make_shard_set, run_cli

SHARDS = [6, 5, 7]  # images per shard; 2 classes, 16x16 RGB


def make_autoencoder(path: Path, seed: int) -> Path:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                  layers_per_block=1, norm_num_groups=8, sample_size=16).save_pretrained(path)
    return path


def write_recipe(path: Path, root: Path, data: Path | None = None) -> Path:
    body = {"name": "latent", "out": str(root / "run"), "seed": 1,
            "data": {"root": str(data or root / "data"), "loader": {"workers": 0, "streams": 2}},
            "diffusion": {"labels": "ground_truth", "flip": True, "latent": {"autoencoder": str(root / "vae")},
                          "model": {"size": "tiny", "patch_size": 2, "conv": False},
                          "train": {"steps": 2, "micro_batch": 4, "checkpoint_every": 2, "log_every": 1,
                                    "sample_every": 2}},
            "sample": {"per_class": 3, "shard_samples": 4, "batch": 3, "steps": 2, "decode_batch": 2}}
    path.write_text(yaml.safe_dump(body))
    return path


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    root = tmp_path_factory.mktemp("latent")
    make_shard_set(root / "data" / "train", SHARDS, num_classes=2, size=16, channels=3)
    make_autoencoder(root / "vae", seed=0)
    recipe = write_recipe(root / "r.yaml", root)
    result = run_cli("-q", "encode", str(recipe))
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def latents(root: Path) -> Path:
    return root / "data" / "latents" / "train"


def stored_moments(root: Path) -> dict[str, np.ndarray]:
    directory = latents(root)
    return {s["__key__"]: np.load(io.BytesIO(s["moments.npy"])) for e in Manifest.load(directory).shards
            for s in iter_samples(directory / e.name)}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_encode_writes_a_verified_latent_set_keyed_like_the_images(encoded):
    manifest, reports, faults = verify(latents(encoded))
    assert not faults
    images = Manifest.load(encoded / "data" / "train")
    assert [e.name for e in manifest.shards] == [e.name for e in images.shards]  # one latent shard per image shard
    assert [r.keys for r in reports] == [[s["__key__"] for s in iter_samples(encoded / "data" / "train" / e.name)]
                                         for e in images.shards]
    assert manifest.image is None and manifest.class_histogram == images.class_histogram == [9, 9]
    meta = manifest.meta["latent"]
    assert meta["shape"] == [4, 8, 8] and meta["flips"] is True and meta["autoencoder"] == str(encoded / "vae")
    assert meta["scale_factor"] == pytest.approx(0.18215)  # the autoencoder's own (diffusers' default)
    moments = stored_moments(encoded)
    assert len(moments) == sum(SHARDS)
    # (views, mean/logvar, C, h, w)
    assert {(m.shape, m.dtype) for m in moments.values()} == {((2, 2, 4, 8, 8), np.dtype("float16"))}


def test_the_flipped_copy_is_the_posterior_of_the_mirror_image(encoded):
    vae = LatentAutoencoder(encoded / "vae")
    moments = stored_moments(encoded)
    train = encoded / "data" / "train"
    samples = [s for e in Manifest.load(train).shards for s in iter_samples(train / e.name)]
    x = torch.stack([decode_image(s["png"], 3) for s in samples]).float() / 127.5 - 1
    stored = torch.stack([torch.from_numpy(moments[s["__key__"]]).float() for s in samples])
    for view, images in enumerate([x, x.flip(-1)]):
        expected = torch.stack(vae.moments(images), 1)
        torch.testing.assert_close(stored[:, view], expected, rtol=2e-3, atol=2e-3)  # float16 storage
    # and not merely the first view mirrored: the encoder does not commute with flips
    assert not torch.allclose(stored[:, 1], stored[:, 0].flip(-1), atol=0.05)


def test_a_repeat_run_rewrites_nothing_and_a_killed_run_redoes_only_unfinished_shards(encoded):
    directory = latents(encoded)
    shards = [directory / e.name for e in Manifest.load(directory).shards]
    before = {p.name: (p.stat().st_mtime_ns, sha256(p)) for p in shards}
    manifest = (directory / "manifest.json").read_bytes()
    recipe = write_recipe(encoded / "again.yaml", encoded)
    result = run_cli("-q", "encode", str(recipe))
    assert result.returncode == 0, result.stderr[-3000:]
    assert {p.name: (p.stat().st_mtime_ns, sha256(p)) for p in shards} == before
    assert (directory / "manifest.json").read_bytes() == manifest

    # A run killed after two of three shards: no manifest, the last shard and its record missing,
    # a temporary left behind.
    (directory / "manifest.json").unlink()
    shards[-1].unlink()
    (directory / ".progress" / f"{shards[-1].name}.json").unlink()
    (directory / f"{shards[-1].name}.tmp").write_bytes(b"left by a crash")
    result = run_cli("-q", "encode", str(recipe))
    assert result.returncode == 0, result.stderr[-3000:]
    after = {p.name: (p.stat().st_mtime_ns, sha256(p)) for p in shards}
    assert {n: after[n] for n in list(after)[:-1]} == {n: before[n] for n in list(before)[:-1]}  # untouched
    assert after[shards[-1].name][1] == before[shards[-1].name][1]  # redone, to the same bytes
    assert not verify(directory)[2]  # complete again, temporary gone


@pytest.mark.parametrize("workers", [0, 2])
def test_the_loader_streams_moments_and_takes_labels_by_key(encoded, workers):
    moments = stored_moments(encoded)
    loader = ShardLoader(latents(encoded), batch_size=4, field="moments.npy", world_size=1, rank=0,
                         settings=loader_settings(workers=workers, streams=2))
    seen = []
    for batch in loader.epoch(0):
        assert "image" not in batch and batch["moments"].shape == (4, 2, 2, 4, 8, 8)
        assert batch["moments"].dtype == torch.float16
        assert batch["cls"].tolist() == [int(k[1:]) % 2 for k in batch["key"]]
        for key, m in zip(batch["key"], batch["moments"]):
            assert torch.equal(m, torch.from_numpy(moments[key]))
        seen += batch["key"]
    assert len(seen) == len(set(seen)) == 16  # 18 samples, full batches of 4
    pseudo = {key: 1 for key in moments}  # as diffusion.labels=pseudo joins the stage-1 labels
    loader = ShardLoader(latents(encoded), batch_size=4, field="moments.npy", labels=pseudo, world_size=1, rank=0,
                         settings=loader_settings())
    assert "cls" not in loader.fields  # the set's own labels are not even read
    assert {c for b in loader.epoch(0) for c in b["cls"].tolist()} == {1}


def test_train_diffusion_and_sample_on_latents(encoded):
    recipe = write_recipe(encoded / "r.yaml", encoded)
    result = run_cli("-q", "train-diffusion", str(recipe))
    assert result.returncode == 0, result.stderr[-3000:]
    weights = encoded / "run" / "diffusion" / "weights.pt"
    export = torch.load(weights, map_location="cpu", weights_only=False)
    assert export["latent"]["autoencoder"] == str(encoded / "vae")
    assert export["latent"]["scale_factor"] == pytest.approx(0.18215)
    assert export["settings"]["in_chans"] == 4 and export["settings"]["img_size"] == 8
    with Image.open(encoded / "run" / "diffusion" / "samples" / "step-00000002.png") as grid:
        assert grid.size == (8 * 18 + 2, 2 * 18 + 2)  # 8 x 2 decoded 16x16 tiles, 2 px apart

    result = run_cli("-q", "sample", str(recipe))
    assert result.returncode == 0, result.stderr[-3000:]
    manifest, _, faults = verify(encoded / "run" / "samples")
    assert not faults and manifest.num_samples == 6
    assert manifest.image["size"] == [16, 16] and manifest.image["channels"] == 3

    other = load_recipe(recipe, ["diffusion.latent.scale_factor=0.5"])
    from dpt_scale.diffusion.export import load_diffusion

    with pytest.raises(UserError, match=r"does not match the recipe's model: .*latent=.* \(recipe: .*x 0\.5\)"):
        load_diffusion(other, weights, torch.device("cpu"))


def test_latent_recipes_need_a_set_of_their_own_autoencoder_and_images(encoded, tmp_path):
    from dpt_scale.diffusion.latents import latent_set

    recipe = write_recipe(tmp_path / "r.yaml", encoded, data=tmp_path / "data")
    assert_one_line_error(run_cli("-q", "train-diffusion", str(recipe)), "no finished latent set",
                          "run `dpt-scale encode RECIPE`")
    recipe = write_recipe(tmp_path / "o.yaml", encoded)
    other = load_recipe(recipe, [f"diffusion.latent.autoencoder={make_autoencoder(tmp_path / 'vae', seed=1)}"])
    with pytest.raises(UserError, match=r"encoded with another autoencoder .*`dpt-scale encode RECIPE`"):
        latent_set(other)
    with pytest.raises(UserError, match="autoencoder not found"):
        latent_set(load_recipe(recipe, [f"diffusion.latent.autoencoder={tmp_path / 'missing'}"]))
    # the same latents beside re-imported images
    shutil.copytree(latents(encoded), latents(tmp_path))
    make_shard_set(tmp_path / "data" / "train", [9, 9], num_classes=2, size=16, channels=3)
    with pytest.raises(UserError, match="encoded from other images"):
        latent_set(load_recipe(write_recipe(tmp_path / "d.yaml", encoded, data=tmp_path / "data")))
