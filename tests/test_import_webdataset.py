"""`dpt-scale data import webdataset`: shards made by stock webdataset's ShardWriter (the layouts of
img2dataset and LAION-style sets) into our shard sets, read back through our loader."""
import io
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from dpt_scale.cli import main
from dpt_scale.data.importer import in_val
from dpt_scale.shards.loader import ShardLoader
from dpt_scale.shards.manifest import Manifest
from dpt_scale.shards.tar import iter_samples
from helpers import REPO, assert_one_line_error, loader_settings, run_cli


def pixels(seed: int, size=(12, 10)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def encoded(array: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def write_shards(pattern: str, samples: list[dict], per_shard: int) -> None:
    """With stock webdataset, as other tools write them (pattern: data-%06d.tar)."""
    with wds.ShardWriter(pattern, maxcount=per_shard, verbose=0) as writer:
        for sample in samples:
            writer.write(sample)


def read_back(directory) -> dict[str, tuple[int, torch.Tensor]]:
    """key -> (label, image as (C, H, W) uint8) through the training loader."""
    loader = ShardLoader(directory, batch_size=1, shuffle=False, drop_last=False, world_size=1, rank=0,
                         settings=loader_settings())
    return {b["key"][0]: (int(b["cls"][0]), b["image"][0]) for b in loader.epoch(0)}


def chw(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array).permute(2, 0, 1)


def run(*args: str) -> int:
    return main(["-q", "data", "import", "webdataset", *map(str, args)])


def test_jpg_and_cls_shards_keep_their_keys_labels_and_bytes(tmp_path):
    """The img2dataset-like layout (jpg, cls, json): one group of shards per input shard, samples in
    their order, JPEG bytes kept as they are when stored as JPEG; --val names the val shards."""
    jpgs = {f"{i:09d}": encoded(pixels(i), "JPEG") for i in range(17)}
    samples = [{"__key__": k, "jpg": v, "cls": i % 3, "json": {"url": f"http://x/{i}"}}
               for i, (k, v) in enumerate(jpgs.items())]
    write_shards(str(tmp_path / "train-%06d.tar"), samples[:14], per_shard=5)
    write_shards(str(tmp_path / "val-%06d.tar"), samples[14:], per_shard=5)
    out = tmp_path / "out"
    assert run(tmp_path / "train-000000.tar", tmp_path / "train-000001.tar", tmp_path / "train-000002.tar",
               "--val", tmp_path / "val-000000.tar", "--out", out, "--format", "jpg") == 0
    train = Manifest.load(out / "train")
    assert [(s.name, s.samples) for s in train.shards] == [
        ("train-000000.tar", 5), ("train-000001.tar", 5), ("train-000002.tar", 4)]
    assert train.classes == ["0", "1", "2"] and train.class_histogram == [5, 5, 4]
    assert train.image == {"field": "jpg", "channels": 3, "size": [12, 10], "min_size": [12, 10],
                           "max_size": [12, 10]}
    assert train.meta["import"]["webdataset"] == {"image": ["jpg", "png", "webp"], "label": "cls", "classes": None}
    got = read_back(out / "train")
    assert list(got) == [f"{i:09d}" for i in range(14)]  # input order, input keys
    assert all(label == i % 3 for i, (label, _) in enumerate(got.values()))
    stored = {s["__key__"]: s["jpg"] for e in train.shards for s in iter_samples(out / "train" / e.name)}
    assert all(stored[k] == jpgs[k] for k in stored)  # no second JPEG compression
    val = Manifest.load(out / "val")
    assert val.num_samples == 3 and val.classes == train.classes
    assert main(["-q", "shards", "verify", str(out / "train")]) == 0


def test_png_with_a_json_label_over_a_brace_range_with_a_held_out_fraction(tmp_path):
    arrays = {f"s{i:04d}": pixels(100 + i) for i in range(40)}
    write_shards(str(tmp_path / "data-%06d.tar"), [
        {"__key__": k, "png": encoded(a, "PNG"), "json": {"label": i % 4, "caption": "a photo"}}
        for i, (k, a) in enumerate(arrays.items())], per_shard=10)
    out = tmp_path / "out"
    assert run(str(tmp_path / "data-{000000..000003}.tar"), "--label", "json:label", "--val-fraction", "0.25",
               "--out", out) == 0
    train, val = read_back(out / "train"), read_back(out / "val")
    assert set(train) | set(val) == set(arrays) and not set(train) & set(val)
    assert set(val) == {k for k in arrays if in_val(k, 0.25)} and 0 < len(val) < 20  # by key, like the other sources
    for key, (label, image) in {**train, **val}.items():
        assert label == int(key[1:]) % 4 and torch.equal(image, chw(arrays[key]))
    assert len(Manifest.load(out / "train").shards) == 4 and Manifest.load(out / "val").classes == ["0", "1", "2", "3"]


def test_class_names_in_txt_read_through_a_pipe_command(tmp_path):
    names = ["cat", "dog", "bird"]
    write_shards(str(tmp_path / "data-%06d.tar"), [
        {"__key__": f"{i:03d}", "webp": encoded(pixels(i), "WEBP"), "txt": names[i % 3]} for i in range(9)],
        per_shard=100)
    (tmp_path / "classes.txt").write_text("bird\ncat\ndog\n")
    out = tmp_path / "out"
    assert run(f"pipe:cat {tmp_path / 'data-000000.tar'}", "--label", "txt", "--classes", tmp_path / "classes.txt",
               "--out", out) == 0
    manifest = Manifest.load(out / "train")
    assert manifest.classes == ["bird", "cat", "dog"] and manifest.class_histogram == [3, 3, 3]
    assert {k: label for k, (label, _) in read_back(out / "train").items()} == {
        f"{i:03d}": ["bird", "cat", "dog"].index(names[i % 3]) for i in range(9)}


def test_samples_without_labels_are_imported_unlabelled(tmp_path):
    """LAION-style: an image and a caption, no class."""
    write_shards(str(tmp_path / "data-%06d.tar"), [
        {"__key__": f"{i:03d}", "jpg": encoded(pixels(i), "JPEG"), "txt": "a caption"} for i in range(6)],
        per_shard=100)
    assert run(tmp_path / "data-000000.tar", "--label", "none", "--out", tmp_path / "out") == 0
    manifest = Manifest.load(tmp_path / "out" / "train")
    assert manifest.unlabelled == 6 and manifest.classes == [] and manifest.num_samples == 6


def test_shards_written_class_by_class_are_imported_with_a_warning(tmp_path, capfd):
    jpg = encoded(pixels(0), "JPEG")
    write_shards(str(tmp_path / "data-%06d.tar"), [{"__key__": f"{i:03d}", "jpg": jpg, "cls": i // 4}
                                                   for i in range(12)], per_shard=4)
    assert run(str(tmp_path / "data-{000000..000002}.tar"), "--out", tmp_path / "out") == 0
    assert "3 of the 3 input shards of the train split hold a single class each" in capfd.readouterr().err
    assert Manifest.load(tmp_path / "out" / "train").class_histogram == [4, 4, 4]


def test_resize_is_the_imagefolder_one_and_a_corrupt_image_is_counted(tmp_path, capfd):
    arrays = {f"{i:03d}": pixels(i, (30, 40)) for i in range(8)}
    samples = [{"__key__": k, "png": encoded(a, "PNG"), "cls": i % 2} for i, (k, a) in enumerate(arrays.items())]
    samples.insert(3, {"__key__": "broken", "png": b"\x89PNG\r\n\x1a\n not really", "cls": 1})
    write_shards(str(tmp_path / "data-%06d.tar"), samples, per_shard=100)
    for i, (key, array) in enumerate(arrays.items()):  # the same images as a class-per-folder tree
        (tmp_path / "tree" / str(i % 2)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(tmp_path / "tree" / str(i % 2) / f"{key}.png")
    assert run(tmp_path / "data-000000.tar", "--image-size", "16", "--out", tmp_path / "out", "--workers", "1") == 0
    err = capfd.readouterr().err
    assert f"skipped unreadable image broken.png in {tmp_path / 'data-000000.tar'}" in err
    manifest = Manifest.load(tmp_path / "out" / "train")
    assert manifest.num_samples == 8 and manifest.meta["unreadable"] == 1 and manifest.image["size"] == [16, 16]
    assert (tmp_path / "out" / "train" / "unreadable.txt").read_text().startswith("broken.png in ")
    assert main(["-q", "data", "import", "imagefolder", str(tmp_path / "tree"), "--image-size", "16",
                 "--out", str(tmp_path / "folder"), "--workers", "1"]) == 0
    reference = {key.split("/")[1]: image for key, (_, image) in read_back(tmp_path / "folder" / "train").items()}
    assert all(torch.equal(image, reference[key]) for key, (_, image) in read_back(tmp_path / "out" / "train").items())


def test_a_killed_import_keeps_its_finished_shards_and_redoes_the_rest(tmp_path):
    """SIGKILL while input shard 2 is being read (its pipe: command waits for a flag file); the rerun
    keeps the output of shards 0 and 1, except where the input was replaced since (shard 0), and
    ends with the same bytes as an import that was never interrupted."""
    def write_input(s: int, seed: int) -> None:
        write_shards(str(tmp_path / f"in{s}-%06d.tar"), [
            {"__key__": f"{s}-{i:02d}", "png": encoded(pixels(seed + i), "PNG"), "cls": i % 2} for i in range(6)], 100)

    for s in range(3):
        write_input(s, 10 * s)
    flag, third = tmp_path / "go", tmp_path / "in2-000000.tar"
    urls = [tmp_path / "in0-000000.tar", tmp_path / "in1-000000.tar",
            f"pipe:while [ ! -e {flag} ]; do sleep 0.05; done; cat {third}"]
    out, command = tmp_path / "out", [sys.executable, "-m", "dpt_scale", "-q", "data", "import", "webdataset"]
    proc = subprocess.Popen([*command, *map(str, urls), "--out", str(out), "--workers", "1"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 120
    while not (out / "train" / "train-000001.done").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the import and its pipe's shell
    proc.communicate()
    assert (out / "train" / "train-000001.done").exists() and not (out / "train" / "manifest.json").exists()
    kept = (out / "train" / "train-000001.tar").stat()
    write_input(0, 500)  # replaced since: redone
    flag.touch()
    result = subprocess.run([*command, *map(str, urls), "--out", str(out), "--workers", "1"], cwd=REPO,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    assert "1 of 3 groups of shards were finished by an earlier run; kept" in result.stdout
    again = (out / "train" / "train-000001.tar").stat()
    assert (again.st_ino, again.st_mtime_ns) == (kept.st_ino, kept.st_mtime_ns)
    assert main(["-q", "data", "import", "webdataset", *map(str, urls), "--out", str(tmp_path / "clean")]) == 0
    ours, clean = Manifest.load(out / "train"), Manifest.load(tmp_path / "clean" / "train")
    assert [s.sha256 for s in ours.shards] == [s.sha256 for s in clean.shards] and ours.num_samples == 18
    assert sorted(p.name for p in (out / "train").iterdir()) == [
        "manifest.json", "train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert torch.equal(read_back(out / "train")["0-03"][1], chw(pixels(503)))


def bad_inputs(tmp):
    """Input shards, each with one problem."""
    jpg = encoded(pixels(0), "JPEG")
    write_shards(str(tmp / "good-%06d.tar"), [{"__key__": f"{i:02d}", "jpg": jpg, "cls": i} for i in range(4)], 2)
    write_shards(str(tmp / "word-%06d.tar"), [{"__key__": "a1", "jpg": jpg, "cls": "cat"}], 10)
    write_shards(str(tmp / "name-%06d.tar"), [{"__key__": "b1", "jpg": jpg, "txt": "zebra"}], 10)
    write_shards(str(tmp / "meta-%06d.tar"), [{"__key__": "c1", "jpg": jpg, "json": {"caption": "hi"}}], 10)
    write_shards(str(tmp / "none-%06d.tar"), [], 10)
    (tmp / "zero.tar").write_bytes(b"")
    (tmp / "classes.txt").write_text("cat\ndog\n")


@pytest.mark.parametrize("args, fragments", [
    (["nowhere-{000000..000003}.tar"], ["input shard not found: nowhere-000000.tar"]),
    (["good-{000000..000001.tar"], ["malformed URL 'good-{000000..000001.tar', named by the URLs (data.paths): its "
                                    "braces do not pair up"]),
    (["pipe:cat missing.tar"], ["the command of 'pipe:cat missing.tar' failed (exit status 1: cat: missing.tar:",
                                "writes a tar file to its standard output"]),
    (["http://127.0.0.1:9/data-000000.tar"], ["cannot read http://127.0.0.1:9/data-000000.tar: no connection could be",
                                              "check the URL and that this machine can reach it"]),
    (["good-000000.tar", "--image-field", "png;webp"], ["sample '00' has no image field png;webp (its fields: cls, "
                                                        "jpg); name the image field with --image-field"]),
    (["word-000000.tar"], ["word-000000.tar: sample 'a1': label cls is 'cat', not an integer class index",
                           "--classes FILE"]),
    (["name-000000.tar", "--label", "txt", "--classes", "classes.txt"],
     ["sample 'b1': label txt is 'zebra', which is not one of the 2 class names", "('cat', 'dog')"]),
    (["good-000000.tar", "good-000001.tar", "--classes", "classes.txt"],
     ["good-000001.tar: sample '02': label cls is 2, but data.webdataset.classes names only 2 classes"]),
    (["meta-000000.tar", "--label", "json:label"], ["sample 'c1' has no label: its 'json' member has no 'label' "
                                                    "(it has: caption)", "--label none"]),
    (["good-000000.tar", "--label", "txt"], ["sample '00' has no label field 'txt' (its fields: cls, jpg)"]),
    (["zero.tar"], ["zero.tar cannot be read as a tar shard (empty file)"]),
    (["none-000000.tar"], ["the train input shards hold no samples: none-000000.tar; check the URLs"]),
    ([], ["data import webdataset expects one or more URLs"]),
    (["good-000000.tar", "good-000001.tar", "good-000000.tar"], ["shard good-000000.tar is named more than once"]),
])
def test_bad_inputs_are_one_line(tmp_path, monkeypatch, capfd, args, fragments):
    bad_inputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("no_proxy", "*")  # curl straight to the closed local port, whatever proxy is set
    before = {p: p.read_bytes() for p in tmp_path.iterdir()}
    assert run(*args, "--out", "o") == 2
    assert {p: p.read_bytes() for p in tmp_path.iterdir() if p.name != "o"} == before  # the inputs untouched
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_keys_repeated_across_input_shards_are_refused(tmp_path, capfd):
    jpg = encoded(pixels(0), "JPEG")
    for name in ("a", "b"):  # two tools' runs, both counting from 0
        write_shards(str(tmp_path / f"{name}-%06d.tar"), [{"__key__": f"{i:02d}", "jpg": jpg, "cls": 0}
                                                           for i in range(3)], 10)
    assert run(tmp_path / "a-000000.tar", tmp_path / "b-000000.tar", "--out", tmp_path / "o") == 2
    line = capfd.readouterr().err.strip()
    assert "\n" not in line and f"sample key '00' appears in both {tmp_path / 'a-000000.tar'} and " in line


def test_a_failing_pipe_is_one_line_from_the_real_command(tmp_path):
    """Through a fresh interpreter and the worker pool: the command's own stderr is not let through."""
    result = run_cli("data", "import", "webdataset", "pipe:cat nothing-here.tar", "pipe:false",
                     "--out", str(tmp_path / "o"), "--workers", "2", cwd=tmp_path)
    assert result.returncode == 2
    assert_one_line_error(result, "the command of 'pipe:cat nothing-here.tar' failed (exit status 1")
