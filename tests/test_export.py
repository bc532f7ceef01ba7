"""`dpt-scale shards export`: an .npz sample batch as guided-diffusion's evaluator reads it, and a PNG
folder tree, both equal to the images the loader decodes; bad targets refused, nothing half-written left."""
from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
from PIL import Image

from dpt_scale.errors import UserError
from dpt_scale.shards import export as export_module
from dpt_scale.shards.decode import decode_image
from dpt_scale.shards.export import export
from dpt_scale.shards.manifest import Manifest
from dpt_scale.shards.tar import iter_samples
from dpt_scale.shards.writer import ShardSetWriter
from helpers import assert_one_line_error, jpeg, make_shard_set, png, run_cli


def decoded(directory, channels=3) -> tuple[np.ndarray, list[int]]:
    """Every image of a set in order, (N, H, W, channels), and its labels (-1: none), read member by member."""
    manifest = Manifest.load(directory)
    field = manifest.image["field"]
    images, labels = [], []
    for entry in manifest.shards:
        for sample in iter_samples(directory / entry.name):
            images.append(decode_image(sample[field], channels).permute(1, 2, 0).numpy())
            labels.append(int(sample["cls"]) if "cls" in sample else -1)
    return np.stack(images), labels


def evaluator_read(path, name: str, batch: int = 7) -> np.ndarray:
    """As guided-diffusion's evaluator reads a member: the .npy header off the zip stream, then batches."""
    with zipfile.ZipFile(path) as zf, zf.open(f"{name}.npy") as f:
        version = np.lib.format.read_magic(f)
        assert version in ((1, 0), (2, 0))
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        assert not fortran
        per = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        parts = []
        while len(data := f.read(batch * per)):
            parts.append(np.frombuffer(data, dtype=dtype).reshape(-1, *shape[1:]))
        return np.concatenate(parts)


@pytest.mark.parametrize("channels", [1, 3])
def test_npz_holds_every_image_as_rgb_and_the_labels(tmp_path, channels, monkeypatch):
    shards = make_shard_set(tmp_path / "s", [9, 12, 5], size=8, channels=channels)
    monkeypatch.setattr(export_module, "CHUNK_BYTES", 5 * 8 * 8 * 3)  # chunks of 5 images, cut across shards
    out = tmp_path / "samples.npz"
    summary = export(shards, "npz", out)
    assert summary["shape"] == [26, 8, 8, 3] and summary["labels"]
    images, labels = decoded(shards)  # grayscale decoded to RGB: the channel repeated
    with np.load(out) as z:
        assert z.files == ["arr_0", "arr_1"]
        assert z["arr_0"].dtype == np.uint8 and z["arr_1"].dtype == np.int64
        assert np.array_equal(z["arr_0"], images) and z["arr_1"].tolist() == labels == [i % 4 for i in range(26)]
    assert np.array_equal(evaluator_read(out, "arr_0"), images)
    if channels == 1:
        assert (images[..., 0] == images[..., 2]).all()


def test_npz_of_jpegs_and_of_unlabelled_or_partly_labelled_sets(tmp_path):
    def write(name, label):
        with ShardSetWriter(tmp_path / name, classes=["a", "b"], prefix="p", max_samples=4, image_field="jpg") as w:
            for i in range(10):
                w.write({"__key__": f"k{i:03d}", "jpg": jpeg(i, 16), "cls": label(i)}, (3, 16, 16))
        return tmp_path / name

    unlabelled, mixed = write("none", lambda i: None), write("mixed", lambda i: i % 2 if i < 6 else None)
    export(unlabelled, "npz", tmp_path / "none.npz")
    with np.load(tmp_path / "none.npz") as z:
        assert z.files == ["arr_0"] and np.array_equal(z["arr_0"], decoded(unlabelled)[0])
    export(mixed, "npz", tmp_path / "mixed.npz")
    with np.load(tmp_path / "mixed.npz") as z:
        assert z["arr_1"].tolist() == [0, 1, 0, 1, 0, 1, -1, -1, -1, -1]


def test_imagefolder_is_a_png_tree_per_class_or_flat(tmp_path):
    shards = make_shard_set(tmp_path / "s", [6, 6], size=8, channels=1)
    out = tmp_path / "tree"
    summary = export(shards, "imagefolder", out)
    assert summary["folders"] == 4
    assert sorted(p.name for p in out.iterdir()) == ["c0", "c1", "c2", "c3"]
    assert sorted(p.name for p in (out / "c1").iterdir()) == ["01.png", "05.png", "09.png"]
    assert (out / "c2" / "06.png").read_bytes() == png(6)  # PNG members copied byte for byte
    images, labels = decoded(shards, channels=1)
    for i, label in enumerate(labels):
        assert np.array_equal(np.asarray(Image.open(out / f"c{label}" / f"{i:02d}.png")), images[i, ..., 0])
    from torchvision.datasets import ImageFolder

    dataset = ImageFolder(str(out))
    assert dataset.classes == ["c0", "c1", "c2", "c3"] and [y for _, y in dataset.samples] == sorted(labels)
    export(shards, "imagefolder", tmp_path / "flat", flat=True)
    assert sorted(p.name for p in (tmp_path / "flat").iterdir()) == [f"{i:02d}.png" for i in range(12)]


def test_imagefolder_writes_jpegs_as_png_of_the_decoded_pixels(tmp_path):
    with ShardSetWriter(tmp_path / "s", classes=["a"], prefix="p", image_field="jpg") as w:
        for i in range(3):
            w.write({"__key__": f"k{i}", "jpg": jpeg(i, 16), "cls": 0}, (3, 16, 16))
    export(tmp_path / "s", "imagefolder", tmp_path / "out")
    images, _ = decoded(tmp_path / "s")
    for i in range(3):
        with Image.open(tmp_path / "out" / "a" / f"{i}.png") as im:
            assert im.format == "PNG" and np.array_equal(np.asarray(im), images[i])


def test_unlabelled_samples_need_flat_and_flat_is_for_imagefolder(tmp_path):
    with ShardSetWriter(tmp_path / "s", classes=["a"], prefix="p") as w:
        for i in range(3):
            w.write({"__key__": f"k{i}", "png": png(i), "cls": 0 if i else None}, (1, 8, 8))
    with pytest.raises(UserError, match="1 of 3 samples have no label, so they have no class folder; pass --flat"):
        export(tmp_path / "s", "imagefolder", tmp_path / "out")
    with pytest.raises(UserError, match="--flat is for --to imagefolder"):
        export(tmp_path / "s", "npz", tmp_path / "out.npz", flat=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]
    export(tmp_path / "s", "imagefolder", tmp_path / "out", flat=True)
    assert len(list((tmp_path / "out").iterdir())) == 3


@pytest.mark.parametrize("to, target", [("npz", "out.npz"), ("imagefolder", "out")])
def test_a_failed_or_killed_export_leaves_nothing_that_looks_finished(tmp_path, to, target):
    shards = make_shard_set(tmp_path / "s", [4, 4, 4])
    second = shards / Manifest.load(shards).shards[1].name
    intact = second.read_bytes()
    second.write_bytes(intact[: len(intact) // 2])
    out = tmp_path / target
    with pytest.raises(UserError, match=f"{second.name}: truncated.*shards verify"):
        export(shards, to, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # no OUT, no temporary
    second.write_bytes(intact)
    # A temporary as a SIGKILLed export leaves it: the next export clears it and finishes.
    tmp = tmp_path / (target + ".tmp")
    if to == "npz":
        tmp.write_bytes(b"PK\x03\x04 half a zip")
    else:
        (tmp / "c0").mkdir(parents=True)
        (tmp / export_module.OURS).touch()
    export(shards, to, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["s", target])


def test_an_interrupt_mid_export_removes_the_temporary(tmp_path, monkeypatch):
    shards = make_shard_set(tmp_path / "s", [4, 4])
    real = export_module._png
    calls = []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(export_module, "_png", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export(shards, "imagefolder", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_bad_inputs_are_one_line_errors_that_write_nothing(tmp_path):
    make_shard_set(tmp_path / "s", [4])
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    (tmp_path / "old.npz").write_bytes(b"an earlier export")
    (tmp_path / "empty").mkdir()
    (tmp_path / "mine.tmp").mkdir()
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    cases = [
        (("s", "--to", "npz", "busy"), "busy is a folder; name a new file as OUT"),
        (("s", "--to", "imagefolder", "busy"), "busy holds other files (notes.txt); name a new folder"),
        (("s", "--to", "npz", "old.npz"), "old.npz exists; name a new file as OUT, or remove it first"),
        (("nowhere", "--to", "npz", "x.npz"), "shard set not found: nowhere"),
        (("busy", "--to", "npz", "x.npz"), "busy has no manifest.json: it is not a complete shard set"),
        (("s", "--to", "png", "x"), "unknown export format --to 'png'; choose npz"),
        (("s", "--to", "imagefolder", "mine"), "mine.tmp exists and is not an unfinished export; remove it"),
    ]
    for args, message in cases:
        result = run_cli("shards", "export", *args, cwd=tmp_path)
        line = assert_one_line_error(result, message)
        assert result.returncode == 2 and line.startswith("error: "), line
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before
    # An empty folder is a fine target for a tree.
    result = run_cli("shards", "export", "s", "--to", "imagefolder", "empty", cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == "empty", result.stderr
    assert len(list((tmp_path / "empty").rglob("*.png"))) == 4


def test_npz_refuses_images_of_several_sizes(tmp_path):
    with ShardSetWriter(tmp_path / "s", classes=["a"], prefix="p") as w:
        for i, size in enumerate((8, 12)):
            w.write({"__key__": f"k{i}", "png": png(i, size), "cls": 0}, (1, size, size))
    with pytest.raises(UserError, match="images of several sizes.*export --to imagefolder"):
        export(tmp_path / "s", "npz", tmp_path / "x.npz")
    export(tmp_path / "s", "imagefolder", tmp_path / "tree")
    assert sorted(Image.open(p).size for p in (tmp_path / "tree" / "a").iterdir()) == [(8, 8), (12, 12)]


def test_the_npz_header_is_what_np_save_writes(tmp_path):
    shards = make_shard_set(tmp_path / "s", [3])
    export(shards, "npz", tmp_path / "x.npz")
    images, labels = decoded(shards)
    reference = io.BytesIO()
    np.savez(reference, images, np.asarray(labels, dtype=np.int64))
    with zipfile.ZipFile(tmp_path / "x.npz") as ours, zipfile.ZipFile(reference) as theirs:
        for name in ("arr_0.npy", "arr_1.npy"):
            assert ours.read(name) == theirs.read(name)
            assert ours.getinfo(name).compress_type == zipfile.ZIP_STORED
