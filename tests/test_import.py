"""`dpt-scale data import`: embedded MNIST, IDX files and image folders into shard sets."""
import gzip
import importlib.resources

import numpy as np
import pytest
import torch
from PIL import Image

from dpt_scale.cli import main
from dpt_scale.shards.decode import decode_image
from dpt_scale.shards.manifest import Manifest
from dpt_scale.shards.tar import iter_samples
from helpers import assert_one_line_error, loader_settings, run_cli


def all_samples(shard_dir):
    m = Manifest.load(shard_dir)
    return {s["__key__"]: s for e in m.shards for s in iter_samples(shard_dir / e.name)}


def test_embedded_mnist_is_imported_losslessly(mnist_root):
    train, val = Manifest.load(mnist_root / "train"), Manifest.load(mnist_root / "val")
    assert train.num_samples == 10_000 and train.class_histogram == [1000] * 10 and len(train.shards) == 10
    assert val.num_samples == 2_000 and val.class_histogram == [200] * 10
    assert train.image["size"] == [28, 28] and train.image["channels"] == 1
    with importlib.resources.files("dpt_scale").joinpath("assets/mnist_subset.npz").open("rb") as f:
        asset = np.load(f)
        index = {int(i): n for n, i in enumerate(asset["train_index"])}
        images, labels = asset["train_images"], asset["train_labels"]
    samples = all_samples(mnist_root / "train")
    for key in list(samples)[:50]:
        n = index[int(key.split("-")[-1])]
        assert int(samples[key]["cls"]) == labels[n]
        assert torch.equal(decode_image(samples[key]["png"], 1)[0], torch.from_numpy(images[n]))
    first_shard = [int(s["cls"]) for s in iter_samples(mnist_root / "train" / train.shards[0].name)]
    assert len(set(first_shard)) == 10  # the import order is shuffled: every shard mixes classes


def test_rerun_keeps_the_same_import_and_refuses_other_settings(mnist_root, capsys):
    assert main(["data", "import", "mnist", "--out", str(mnist_root)]) == 0
    assert "already imported with the same settings" in capsys.readouterr().out
    assert main(["data", "import", "mnist", "--out", str(mnist_root), "--format", "jpg"]) == 2
    assert "imported with other settings (format differ); pass --force" in capsys.readouterr().err
    assert Manifest.load(mnist_root / "train").image["field"] == "png"  # left intact


def test_force_replaces_and_foreign_folders_are_refused(tmp_path, capsys):
    out = tmp_path / "d"
    assert main(["data", "import", "mnist", "--out", str(out), "--shard-samples", "4000"]) == 0
    assert main(["data", "import", "mnist", "--out", str(out), "--shard-samples", "6000", "--force"]) == 0
    assert [s.samples for s in Manifest.load(out / "train").shards] == [6000, 4000]
    names = sorted(p.name for p in (out / "train").iterdir())
    assert names == ["manifest.json", "train-000000.tar", "train-000001.tar"]
    (tmp_path / "photos" / "train").mkdir(parents=True)
    (tmp_path / "photos" / "train" / "holiday.jpg").write_bytes(b"mine")
    assert main(["data", "import", "mnist", "--out", str(tmp_path / "photos")]) == 2
    assert "holds files this import did not make (holiday.jpg)" in capsys.readouterr().err
    assert (tmp_path / "photos" / "train" / "holiday.jpg").read_bytes() == b"mine"


def write_idx(path, array, compress=False):
    codes = {np.uint8: 0x08, np.int32: 0x0C}
    header = bytes([0, 0, codes[array.dtype.type], array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    (gzip.open if compress else open)(path, "wb").write(data)


def test_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (30, 12, 10), dtype=np.uint8)
    labels = (np.arange(30) % 3).astype(np.uint8)
    write_idx(tmp_path / "tr-img", images)
    write_idx(tmp_path / "tr-lab.gz", labels, compress=True)
    write_idx(tmp_path / "va-img", images[:6])
    write_idx(tmp_path / "va-lab", labels[:6])
    out = tmp_path / "out"
    assert main(["-q", "data", "import", "idx", str(tmp_path / "tr-img"), str(tmp_path / "tr-lab.gz"),
                 "--val", str(tmp_path / "va-img"), str(tmp_path / "va-lab"), "--out", str(out),
                 "--shard-samples", "8"]) == 0
    train = Manifest.load(out / "train")
    assert train.classes == ["0", "1", "2"] and train.class_histogram == [10, 10, 10]
    assert [s.samples for s in train.shards] == [8, 8, 8, 6] and train.image["size"] == [12, 10]
    samples = all_samples(out / "train")
    assert torch.equal(decode_image(samples["train-000007"]["png"], 1)[0], torch.from_numpy(images[7]))
    assert Manifest.load(out / "val").num_samples == 6


def test_groups_over_the_byte_limit_continue_in_extra_shards(tmp_path):
    from dpt_scale.shards.loader import ShardLoader

    rng = np.random.default_rng(0)
    write_idx(tmp_path / "img", rng.integers(0, 256, (30, 12, 10), dtype=np.uint8))
    write_idx(tmp_path / "lab", (np.arange(30) % 3).astype(np.uint8))
    out = tmp_path / "out"
    assert main(["-q", "data", "import", "idx", str(tmp_path / "img"), str(tmp_path / "lab"), "--out", str(out),
                 "--shard-samples", "8", "--set", "data.shard_bytes=6000", "--workers", "2"]) == 0
    manifest = Manifest.load(out / "train")
    names = [s.name for s in manifest.shards]
    assert names[:2] == ["train-000000.tar", "train-000000-1.tar"] and len(names) > 4
    assert all(s.bytes <= 6000 + 10240 for s in manifest.shards) and manifest.num_samples == 30
    loader = ShardLoader(out / "train", batch_size=5, drop_last=False, world_size=1, rank=0, settings=loader_settings())
    assert sorted(k for b in loader.epoch(0) for k in b["key"]) == [f"train-{i:06d}" for i in range(30)]
    assert run_cli("shards", "verify", str(out / "train")).returncode == 0


def test_broken_idx_is_a_clear_error(tmp_path):
    (tmp_path / "img").write_bytes(b"\x00\x00\x08\x03" + (5).to_bytes(4, "big") * 3 + b"short")
    write_idx(tmp_path / "lab", np.zeros(5, np.uint8))
    result = run_cli("data", "import", "idx", str(tmp_path / "img"), str(tmp_path / "lab"),
                     "--out", str(tmp_path / "o"))
    assert_one_line_error(result, "img", "truncated or damaged")


def make_folder(root, classes=("cat", "dog"), per_class=6, size=(40, 30)):
    rng = np.random.default_rng(1)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            array = rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)
            Image.fromarray(array).save(root / c / f"img_{i}.{'png' if i % 2 else 'jpg'}")


def test_image_folder_with_a_corrupt_file(tmp_path):
    make_folder(tmp_path / "src" / "train")
    make_folder(tmp_path / "src" / "val", per_class=2)
    (tmp_path / "src" / "train" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tmp_path / "src" / "train" / "dog" / "notes.txt").write_text("not an image")
    (tmp_path / "src" / "train" / "cat" / "a.b c.png").write_bytes((tmp_path / "src/train/cat/img_1.png").read_bytes())
    out = tmp_path / "out"
    result = run_cli("data", "import", "imagefolder", str(tmp_path / "src"), "--out", str(out),
                     "--image-size", "16", "--format", "jpg", "--workers", "2")
    assert result.returncode == 0, result.stderr
    assert f"skipped unreadable image {tmp_path / 'src/train/dog/broken.jpg'}" in result.stderr
    assert "ignored 1 file(s) without an image extension" in result.stderr
    assert "1 unreadable image(s) skipped" in result.stdout
    train = Manifest.load(out / "train")
    assert train.num_samples == 13 and train.meta["unreadable"] == 1 and train.classes == ["cat", "dog"]
    assert train.class_histogram == [7, 6] and train.image == {
        "field": "jpg", "channels": 3, "size": [16, 16], "min_size": [16, 16], "max_size": [16, 16]}
    assert "broken.jpg" in (out / "train" / "unreadable.txt").read_text()
    assert set(all_samples(out / "train")) == {f"{c}/img_{i}" for c in ("cat", "dog") for i in range(6)} | {"cat/a_b_c"}
    assert Manifest.load(out / "val").class_histogram == [2, 2]


def test_flat_image_folder_with_a_held_out_fraction(tmp_path):
    make_folder(tmp_path / "src", per_class=20)
    out = tmp_path / "out"
    assert main(["-q", "data", "import", "imagefolder", str(tmp_path / "src"), "--out", str(out),
                 "--val-fraction", "0.25", "--workers", "1"]) == 0
    train, val = all_samples(out / "train"), all_samples(out / "val")
    assert len(train) + len(val) == 40 and 4 <= len(val) <= 18 and not set(train) & set(val)
    again = tmp_path / "again"
    main(["-q", "data", "import", "imagefolder", str(tmp_path / "src"), "--out", str(again),
          "--val-fraction", "0.25", "--workers", "2"])
    assert set(all_samples(again / "val")) == set(val)  # the split depends on the keys only
    assert Manifest.load(out / "train").image["size"] == [30, 40]  # originals, not resized


@pytest.mark.parametrize("args, fragment", [
    (["imagefolder", "/nonexistent/tree"], "image folder not found: /nonexistent/tree"),
    (["idx", "only-one-path"], "expects two paths: IMAGES LABELS"),
    (["mnist", "extra"], "expects no paths"),
])
def test_bad_sources(tmp_path, args, fragment):
    assert_one_line_error(run_cli("data", "import", *args, "--out", str(tmp_path / "o")), fragment)
