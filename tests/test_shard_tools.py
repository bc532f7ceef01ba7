"""`dpt-scale shards ls|stat|verify|show` and the same through tools/shards.py."""
import hashlib
import json
import subprocess
import sys

from PIL import Image

from dpt_scale.shards.manifest import Manifest
from helpers import REPO, make_shard_set, run_cli


def verify(shard_dir):
    return run_cli("shards", "verify", str(shard_dir))


def test_verify_passes_a_good_set_and_lists_every_bad_shard(tmp_path):
    shards = make_shard_set(tmp_path / "s", [5, 5, 5, 5, 5])
    ok = verify(shards)
    assert ok.returncode == 0 and "OK, 5 shards and 25 samples verified" in ok.stdout
    names = [e.name for e in Manifest.load(shards).shards]
    data = (shards / names[1]).read_bytes()
    (shards / names[1]).write_bytes(data[: len(data) // 3])  # truncated
    flipped = bytearray((shards / names[2]).read_bytes())
    flipped[1024 + 512 + 60] ^= 0xFF  # one byte inside the first image
    (shards / names[2]).write_bytes(bytes(flipped))
    (shards / names[3]).unlink()  # missing
    (shards / "part-000099.tar").write_bytes(data)  # not in the manifest
    (shards / "part-000005.tar.tmp").write_bytes(b"x")  # left by a crash
    bad = verify(shards)
    assert bad.returncode == 1, bad.stdout
    lines = bad.stdout.splitlines()
    assert any(names[1] in l and "truncated" in l for l in lines)
    assert any(names[1] in l and "sha256 differs" in l for l in lines)
    assert any(names[2] in l and "member 's00010.png'" in l and "does not decode" in l for l in lines)
    assert any(names[3] in l and "missing" in l for l in lines)
    assert any("part-000099.tar" in l and "not listed in the manifest" in l for l in lines)
    assert any("part-000005.tar.tmp" in l and "interrupted write" in l for l in lines)
    assert not any(names[0] in l for l in lines if l.startswith("FAULT")) and not any(
        names[4] in l for l in lines if l.startswith("FAULT"))
    summary = lines[-1]
    assert all(n in summary for n in names[1:4])


def test_verify_catches_a_wrong_index(tmp_path):
    import json

    shards = make_shard_set(tmp_path / "s", [100])
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["shards"][0]["offsets"][1] += 512
    (shards / "manifest.json").write_text(json.dumps(manifest))
    result = verify(shards)
    assert result.returncode == 1 and "sample offsets differ from the manifest's index" in result.stdout


def test_verify_checks_each_shards_sample_index_against_its_samples(tmp_path):
    shards = make_shard_set(tmp_path / "s", [20, 20])
    entry = Manifest.load(shards).shards[1]
    data = bytearray((shards / entry.name).read_bytes())
    at = data.find("s00021".encode("utf-32-le"), entry.index[0])  # the index's second key
    data[at + 5 * 4] = ord("7")  # now says s00027
    (shards / entry.name).write_bytes(bytes(data))
    manifest = json.loads((shards / "manifest.json").read_text())  # as a writer with a bug in its index says
    manifest["shards"][1]["index_sha256"] = hashlib.sha256(data[entry.index[0]:entry.index[1]]).hexdigest()
    (shards / "manifest.json").write_text(json.dumps(manifest))
    result = verify(shards)
    assert result.returncode == 1
    assert any(entry.name in l and "__index__" in l and "sample index differs" in l for l in result.stdout.splitlines())


def test_verify_catches_duplicate_keys_and_bad_labels(tmp_path):
    from dpt_scale.shards.writer import ShardSetWriter
    from helpers import png

    with ShardSetWriter(tmp_path / "s", classes=["a", "b"], max_samples=2) as w:
        for i, key in enumerate(["k0", "k1", "k1", "k2"]):
            w.write({"__key__": key, "png": png(i), "cls": i % 2}, (1, 8, 8))
    result = verify(tmp_path / "s")
    assert result.returncode == 1 and "key 'k1' also appears in shard-000000.tar" in result.stdout


def test_show_writes_a_grid_per_class(mnist_root, tmp_path):
    out = tmp_path / "grid.png"
    result = run_cli("shards", "show", str(mnist_root / "val"), "--per-class", "5", "--out", str(out))
    assert result.returncode == 0, result.stderr
    with Image.open(out) as grid:
        assert grid.mode == "RGB" and grid.height == 10 * 30 + 2 and grid.width == 64 + 5 * 30 + 2
    first = tmp_path / "first.png"
    assert run_cli("shards", "show", str(mnist_root / "val"), "-n", "16", "--out", str(first)).returncode == 0
    with Image.open(first) as grid:
        assert grid.size == (4 * 30 + 2, 4 * 30 + 2)


def test_ls_and_stat(mnist_root):
    ls = run_cli("shards", "ls", str(mnist_root / "val"))
    assert ls.returncode == 0 and "val-000001.tar" in ls.stdout and "2 shards, 2000 samples" in ls.stdout
    stat = run_cli("shards", "stat", str(mnist_root / "val"), "--json")
    figures = json.loads(stat.stdout)
    assert figures["samples"] == 2000 and figures["classes"]["7"] == 200
    assert figures["image"]["size"] == [28, 28]


def test_tools_script_runs_the_same_commands(mnist_root):
    result = subprocess.run([sys.executable, str(REPO / "tools" / "shards.py"), "stat", str(mnist_root / "train")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "10000 samples in 10 shards" in result.stdout


def test_every_command_has_help():
    for command in (["--help"], ["data", "import", "--help"], ["data", "subset", "--help"],
                    ["shards", "verify", "--help"], ["shards", "show", "--help"]):
        result = run_cli(*command)
        assert result.returncode == 0 and "usage: dpt-scale" in result.stdout
    result = run_cli("shards", "verify")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "required: DIR" in result.stderr


def test_quiet_flag_goes_before_or_after_the_command(tmp_path):
    for args in (["-q", "data", "import", "mnist", "--out", str(tmp_path / "a")],
                 ["data", "import", "mnist", "--out", str(tmp_path / "b"), "-q"]):
        result = run_cli(*args)
        assert result.returncode == 0 and "resolved recipe" not in result.stdout
    loud = run_cli("data", "import", "mnist", "--out", str(tmp_path / "a"))
    assert "resolved recipe" in loud.stdout and "already imported" in loud.stdout
