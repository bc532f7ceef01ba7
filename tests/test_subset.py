"""`dpt-scale data subset`: K labelled keys per class, or keys from a list of names."""
from collections import Counter

import pytest

from dpt_scale.cli import main
from dpt_scale.data.subset import read_labels, subset_from_list
from dpt_scale.errors import UserError
from helpers import assert_one_line_error, make_shard_set, run_cli


def read_keys(path):
    return [line for line in path.read_text().splitlines() if line and not line.startswith("#")]


def test_k_per_class_is_balanced_and_fixed_by_the_seed(mnist_root, tmp_path):
    labels = read_labels(mnist_root / "train")
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        out = tmp_path / f"{name}.txt"
        assert main(["-q", "data", "subset", "--shards", str(mnist_root / "train"), "--per-class", "4",
                     "--seed", str(seed), "--out", str(out)]) == 0
        runs[name] = read_keys(out)
    assert runs["a"] == runs["b"] != runs["c"]
    assert Counter(labels[k] for k in runs["a"]) == {c: 4 for c in range(10)}
    assert (tmp_path / "a.recipe.yaml").is_file()
    assert "4 per class, seed 0" in (tmp_path / "a.txt").read_text().splitlines()[0]


def test_subset_does_not_depend_on_the_shard_layout(tmp_path):
    a = make_shard_set(tmp_path / "a", [40])
    b = make_shard_set(tmp_path / "b", [3, 17, 20])
    for name, shards in (("a", a), ("b", b)):
        main(["-q", "data", "subset", "--shards", str(shards), "--per-class", "2",
              "--out", str(tmp_path / f"{name}.txt")])
    assert read_keys(tmp_path / "a.txt") == read_keys(tmp_path / "b.txt")


def test_from_a_list_of_file_names_or_keys(tmp_path):
    labels = {"n01440764/n01440764_10026": 0, "n01440764/n01440764_9981": 0, "n04235860/n04235860_14959": 1}
    names = ["n04235860_14959.JPEG", "n01440764/n01440764_9981"]  # the MSN list style, and a plain key
    assert subset_from_list(labels, names) == ["n04235860/n04235860_14959", "n01440764/n01440764_9981"]
    with pytest.raises(UserError, match=r"1 listed name\(s\) match no sample.*n09999999_1.JPEG"):
        subset_from_list(labels, names + ["n09999999_1.JPEG"])
    with pytest.raises(UserError, match="names some images twice"):
        subset_from_list(labels, ["n04235860_14959.JPEG", "n04235860/n04235860_14959"])
    with pytest.raises(UserError, match="match several samples"):
        subset_from_list({"a/x_1": 0, "b/x_1": 1}, ["x_1.JPEG"])


def test_subset_cli_errors(tmp_path):
    shards = make_shard_set(tmp_path / "s", [10])  # 10 samples, 4 classes: classes 2 and 3 have 2 each
    result = run_cli("data", "subset", "--shards", str(shards), "--per-class", "3", "--out", str(tmp_path / "k.txt"))
    assert_one_line_error(result, "class 2 ('c2') has 2 image(s), fewer than --per-class 3", "lower --per-class")
    (tmp_path / "list.txt").write_text("# names\ns00001.png\nnot-there.png\n")
    result = run_cli("data", "subset", "--shards", str(shards), "--from-list", str(tmp_path / "list.txt"),
                     "--out", str(tmp_path / "k.txt"))
    assert_one_line_error(result, "match no sample", "not-there.png")
    assert not (tmp_path / "k.txt").exists()
    result = run_cli("data", "subset", "--shards", str(tmp_path / "nowhere"), "--out", str(tmp_path / "k.txt"))
    assert_one_line_error(result, "shard set not found")


def test_a_shard_set_without_labels_is_a_clear_error(tmp_path):
    from dpt_scale.shards.writer import ShardSetWriter
    from helpers import png

    with ShardSetWriter(tmp_path / "s", classes=["a", "b"]) as w:
        for i in range(4):
            w.write({"__key__": f"k{i}", "png": png(i)}, (1, 8, 8))
    with pytest.raises(UserError, match="no sample carries a label"):
        read_labels(tmp_path / "s")
