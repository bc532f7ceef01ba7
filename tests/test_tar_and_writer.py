"""Writing shards atomically, and reading them with our parser, stock tar and stock webdataset."""
import hashlib
import io
import signal
import subprocess
import sys
import tarfile
import textwrap
import time

import pytest
import webdataset as wds

from dpt_scale.errors import ShardError
from dpt_scale.shards.manifest import Manifest
from dpt_scale.shards.tar import TarFormatError, iter_samples
from dpt_scale.shards.writer import ShardSetWriter, ShardWriter
from helpers import make_shard_set, png


def test_exception_while_writing_leaves_no_shard_and_no_temporary(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path / "a.tar") as w:
            w.write({"__key__": "k0", "png": png(0), "cls": 1})
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []


def test_killed_writer_leaves_only_a_temporary_that_the_next_writer_removes(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        from dpt_scale.shards.writer import ShardSetWriter
        w = ShardSetWriter({str(tmp_path)!r}, classes=["a"], prefix="part", max_samples=10**6)
        for i in range(10**6):
            w.write({{"__key__": f"k{{i}}", "png": b"x" * 100, "cls": 0}})
            if i == 50:
                print("writing", flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["part-000000.tar.tmp"]  # no final name, no manifest
    with ShardSetWriter(tmp_path, classes=["a"], prefix="part") as w:
        w.write({"__key__": "k0", "png": png(0), "cls": 0})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "part-000000.tar"]


def test_rollover_by_samples_and_bytes(tmp_path):
    with ShardSetWriter(tmp_path / "n", classes=["a", "b"], max_samples=4) as w:
        for i in range(10):
            w.write({"__key__": f"k{i}", "png": png(i), "cls": i % 2}, (1, 8, 8))
    assert [s.samples for s in w.manifest.shards] == [4, 4, 2]
    with ShardSetWriter(tmp_path / "b", classes=["a"], max_bytes=6000) as w:
        for i in range(10):
            w.write({"__key__": f"k{i}", "bin": b"x" * 1500, "cls": 0})
    assert all(s.bytes <= 6000 + 10240 for s in w.manifest.shards)  # + tar's end-of-archive record
    assert sum(s.samples for s in w.manifest.shards) == 10 and len(w.manifest.shards) > 2


def test_manifest_describes_the_files(tmp_path):
    make_shard_set(tmp_path, [3, 5])
    m = Manifest.load(tmp_path)
    assert [s.samples for s in m.shards] == [3, 5] and m.num_samples == 8
    assert m.class_histogram == [2, 2, 2, 2] and m.classes == ["c0", "c1", "c2", "c3"]
    assert m.image == {"field": "png", "channels": 1, "size": [8, 8], "min_size": [8, 8], "max_size": [8, 8]}
    for s in m.shards:
        data = (tmp_path / s.name).read_bytes()
        assert len(data) == s.bytes and hashlib.sha256(data).hexdigest() == s.sha256


def test_same_samples_give_identical_bytes(tmp_path):
    a = make_shard_set(tmp_path / "a", [4])
    time.sleep(1.1)  # a writer that stamped the time would differ now
    b = make_shard_set(tmp_path / "b", [4])
    assert Manifest.load(a).shards[0].sha256 == Manifest.load(b).shards[0].sha256


def test_stock_tar_and_stock_webdataset_read_our_shards(tmp_path):
    make_shard_set(tmp_path, [6])
    shard = str(tmp_path / "part-000000.tar")
    listed = subprocess.run(["tar", "-tf", shard], capture_output=True, text=True, check=True).stdout.split()
    assert listed[:2] == ["s00000.cls", "s00000.png"] and len(listed) == 13
    assert listed[-1] == "__index__"  # our sample index, which webdataset skips as metadata
    samples = list(wds.WebDataset(shard, shardshuffle=False).decode("l8"))
    assert [s["__key__"] for s in samples] == [f"s{i:05d}" for i in range(6)]
    assert [int(s["cls"]) for s in samples] == [0, 1, 2, 3, 0, 1]
    assert samples[0]["png"].shape == (8, 8)


def test_parser_agrees_with_tarfile_on_foreign_archives(tmp_path):
    """ustar with a long path prefix, pax headers, GNU long names, directories."""
    long_dir = "d" * 120
    members = [("dir/a.png", b"1"), (f"{long_dir}/b.cls", b"22"), (f"{long_dir}/b.png", b"333"),
               ("x" * 150 + ".png", b"4444")]
    for fmt in (tarfile.USTAR_FORMAT, tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        items = members[:3] if fmt == tarfile.USTAR_FORMAT else members  # ustar: no 150-character names
        path = tmp_path / f"{fmt}.tar"
        with tarfile.open(path, "w", format=fmt) as tf:
            info = tarfile.TarInfo("dir")
            info.type = tarfile.DIRTYPE
            tf.addfile(info)
            for name, data in items:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        got = [(s["__key__"], sorted((k, v) for k, v in s.items() if not k.startswith("__")))
               for s in iter_samples(path)]
        expected = {"dir/a": [("png", b"1")], f"{long_dir}/b": [("cls", b"22"), ("png", b"333")],
                    "x" * 150: [("png", b"4444")]}
        assert got == [(k, expected[k]) for k in dict.fromkeys(n.split(".")[0] for n, _ in items)]


def test_start_stop_and_field_selection(tmp_path):
    make_shard_set(tmp_path, [10])
    shard = tmp_path / "part-000000.tar"
    keys = [s["__key__"] for s in iter_samples(shard, 3, 6)]
    assert keys == ["s00003", "s00004", "s00005"]
    only_cls = list(iter_samples(shard, fields=frozenset({"cls"})))
    assert all({k for k in s if not k.startswith("__")} == {"cls"} for s in only_cls) and len(only_cls) == 10


@pytest.mark.parametrize("cut, reason", [(1024 + 512 + 20, "truncated inside member 's00000.png'"),
                                         (1024 * 3 + 100, "truncated"),
                                         (None, "without an end-of-archive marker")])
def test_truncated_shards_are_named_with_their_member(tmp_path, cut, reason):
    make_shard_set(tmp_path, [4])
    shard = tmp_path / "part-000000.tar"
    data = shard.read_bytes()
    if cut is None:  # cut exactly after the last member's data: a crash between members
        members = list(tarfile.open(shard))
        last = members[-1]
        cut = last.offset_data + (last.size + 511) // 512 * 512
    shard.write_bytes(data[:cut])
    with pytest.raises(TarFormatError) as info:
        list(iter_samples(shard))
    assert str(shard) in str(info.value) and reason in str(info.value)


def test_missing_and_empty_shards(tmp_path):
    with pytest.raises(ShardError, match="shard is missing"):
        list(iter_samples(tmp_path / "nope.tar"))
    (tmp_path / "empty.tar").write_bytes(b"")
    with pytest.raises(ShardError, match="empty file"):
        list(iter_samples(tmp_path / "empty.tar"))


def test_the_manifest_index_lets_readers_start_inside_a_shard(tmp_path):
    make_shard_set(tmp_path, [300])
    m = Manifest.load(tmp_path)
    shard = tmp_path / m.shards[0].name
    assert len(m.shards[0].offsets) == 5 and m.index_every == 64  # samples 0, 64, 128, 192, 256
    everything = list(iter_samples(shard))
    assert [s["__offset__"] for s in everything[::64]] == m.shards[0].offsets
    for start in (0, 63, 64, 200, 299):
        seek = m.seek(0, start)
        assert seek[0] <= start and seek[0] % 64 == 0
        assert list(iter_samples(shard, start, start + 5, seek=seek)) == everything[start:start + 5]


def test_written_json_holds_no_nan_or_infinity(tmp_path, caplog):
    """NaN and Infinity are not JSON: a figure that could not be computed is written as null, with
    a warning naming it."""
    import json

    from dpt_scale.shards.manifest import write_json

    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    path = write_json(tmp_path / "m.json", {"fid": float("nan"), "per_class": [0.5, float("inf")], "top1": 0.9})
    assert json.loads(path.read_text(), parse_constant=refuse) == {"fid": None, "per_class": [0.5, None], "top1": 0.9}
    assert "fid is nan, written as null" in caplog.text and "per_class[1] is inf" in caplog.text
