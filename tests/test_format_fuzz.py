"""The file formats we read, damaged on purpose: manifest.json, the shards' `__index__` members, tar
shards and labelled-subset lists, through the real readers (Manifest.load, ShardLoader, map_shards,
LabelledBank, `dpt-scale shards verify`).

The rule for every case: a reader either gives exactly the original samples (keys, labels, pixels)
or stops with one line of UserError naming the file; never another exception, a hang or a silent
misreading. And `shards verify` says OK only about a set that every reader reads as written, and
never about one that a reader refuses or skips. Damage that only the manifest's sha256 can tell
(see mutate_tar) is held to the second half alone. Seeded (derandomize) and bounded; CASES counts
the cases each kind ran (printed at the end with `pytest -s`; docs/reliability.md lists them).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
import signal
import tarfile
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from PIL import Image

from dpt_scale.classification.pseudo_labels import FORMAT as LABELS_FORMAT
from dpt_scale.classification.pseudo_labels import MANIFEST as LABELS_MANIFEST
from dpt_scale.classification.pseudo_labels import (
    load_pseudo_labels,
    read_sidecar,
    sidecar_name,
    summarise,
    write_sidecar,
)
from dpt_scale.classification.pseudo_labels import read_manifest as read_labels_manifest
from dpt_scale.classification.selection import most_confident_per_class
from dpt_scale.cli import main
from dpt_scale.data.labelled import LabelledBank
from dpt_scale.errors import UserError
from dpt_scale.recipe.schema import PseudoLabel
from dpt_scale.shards.loader import ShardLoader
from dpt_scale.shards.manifest import MANIFEST, Manifest
from dpt_scale.shards.map_shards import map_shards
from dpt_scale.shards.writer import ShardSetWriter
from helpers import loader_settings, png

CASES: Counter = Counter()
ANY = object()
CLASSES = 4
# Three shards: short keys; keys over 100 characters (so the tar has pax headers); one unlabelled
# sample among short keys.
LONG = "n" * 110
KEYS = [[f"s{i:05d}" for i in range(5)], [f"{LONG}{i:03d}" for i in range(4)], [f"t{i:05d}" for i in range(4)]]
UNLABELLED = "t00002"
# No shrinking: a failing case is reported with its draws, at once.
SEEDED = dict(derandomize=True, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def label_of(key: str) -> int:
    return -1 if key == UNLABELLED else sum(map(ord, key)) % CLASSES


class Original(dict):
    """key -> (label, pixels), and `shards`: shard name -> its keys; shown short in a failing case's report."""

    shards: dict[str, list[str]]

    def __repr__(self) -> str:
        return f"<{len(self)} samples>"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The set every case damages a copy of, and what reading it must give: key -> (label, pixels)."""
    root = tmp_path_factory.mktemp("fuzz")
    original, value = Original(), 0
    with ShardSetWriter(root / "set", classes=[f"c{c}" for c in range(CLASSES)], prefix="part") as writer:
        for keys in KEYS:
            for key in keys:
                data = png(value)
                sample = {"__key__": key, "png": data}
                if label_of(key) >= 0:
                    sample["cls"] = label_of(key)
                writer.write(sample, (1, 8, 8))
                with Image.open(io.BytesIO(data)) as image:
                    original[key] = (label_of(key), np.asarray(image)[np.newaxis].tobytes())
                value += 1
            writer.end_shard()
    original.shards = {entry.name: keys for entry, keys in zip(writer.manifest.shards, KEYS)}
    yield root / "set", original
    print("\nformat fuzz cases: " + ", ".join(f"{kind} {n}" for kind, n in sorted(CASES.items())))


@contextlib.contextmanager
def copy_of(base_dir: Path):
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "set"
        shutil.copytree(base_dir, target)
        yield target


@contextlib.contextmanager
def deadline(seconds: int):
    """A hang fails the case instead of stalling CI."""
    def hung(*_):
        raise TimeoutError(f"no result after {seconds} s: a reader hangs")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ---- the readers, each giving the samples it read or the error it stopped with

def attempt(read):
    try:
        return read()
    except UserError as exc:
        return exc


def by_loader(directory: Path, workers: int = 0, on_corrupt: str = "error"):
    """Every sample once (one rank, no shuffle, no dropped batch), sorted by key; and how many were lost."""
    loader = ShardLoader(directory, batch_size=3, shuffle=False, drop_last=False, world_size=1, rank=0,
                         settings=loader_settings(workers=workers, streams=2 if workers else 1, on_corrupt=on_corrupt))
    got = [(key, label, image.numpy().tobytes()) for batch in loader.epoch(0)
           for key, label, image in zip(batch["key"], batch["cls"].tolist(), batch["image"].contiguous())]
    return sorted(got), loader.lost


def by_map_shards(directory: Path, workers: int = 0):
    shards = list(range(len(Manifest.load(directory).shards)))
    got = []
    for out in map_shards(lambda x: x.clone(), directory, shards, batch_size=3, device=torch.device("cpu"),
                          workers=workers, read_labels=True):
        got += [(k, int(c), im.numpy().tobytes()) for k, c, im in zip(out.keys, out.labels, out.outputs)]
    return sorted(got)


def by_bank(directory: Path):
    """Stage 1's reader: the labelled images of every labelled key, found by walking the shards."""
    listed = directory.parent / "labelled.txt"
    listed.write_text("".join(f"{k}\n" for keys in KEYS for k in keys if k != UNLABELLED))
    bank = LabelledBank.from_subset(directory, listed)
    return sorted((k, c, im.numpy().tobytes()) for k, c, im in zip(bank.keys, bank.labels.tolist(), bank.images))


def verify_says_ok(directory: Path, workers: int = 1) -> bool:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["shards", "verify", str(directory), "--workers", str(workers)])
    assert code in (0, 1, 2), code
    if code == 2:  # the set could not be read at all: one line
        assert err.getvalue().count("error:") == 1 and "Traceback" not in err.getvalue(), err.getvalue()
    assert (code == 0) == ("OK," in out.getvalue()), out.getvalue()
    return code == 0


def expected(original: Original, manifest: Manifest | None = None) -> list | None:
    """What a reader must give: the whole set, or (given a changed manifest that loads) what that
    manifest describes; None where it describes what the shards do not hold, so that reading it
    at all would be a misreading."""
    if manifest is None:
        return sorted((key, label, pixels) for key, (label, pixels) in original.items())
    want = []
    for entry in manifest.shards:
        keys = original.shards.get(entry.name, [])
        if entry.samples != len(keys) and entry.samples != 0:  # not opened when it lists none
            return None
        want += keys if entry.samples else []
    if manifest.image is None or manifest.image["field"] != "png" or manifest.image["size"] not in (None, [8, 8]):
        return None
    if any(original[k][0] >= manifest.num_classes for k in want):
        return None
    channels = manifest.image["channels"]  # a gray image read as RGB: the gray value three times
    return sorted((k, original[k][0], original[k][1] * channels) for k in want)


def described(original: Original, manifest: Manifest | UserError) -> list | None:
    return None if isinstance(manifest, UserError) else expected(original, manifest)


def assert_one_line(error: UserError, *names: str) -> None:
    message = str(error)
    assert "\n" not in message, message
    if message.startswith("the shard set holds"):  # too few samples for the batch size: about the settings
        return
    assert any(name in message for name in names), f"the error names none of {names}: {message}"


def check(directory: Path, original: Original, names: tuple[str, ...], workers: int = 0, skip: bool = True,
          want: list | None | str = "all") -> dict:
    """Run every reader over a damaged copy and check the rule; returns what each gave. `want`:
    what the readers must give if they read (None: they must refuse; ANY: damage that only the
    manifest's checksums tell, so that only `shards verify` must see it), by default the whole set."""
    with deadline(60):
        manifest = attempt(lambda: Manifest.load(directory))
        loaded = attempt(lambda: by_loader(directory, workers))
        mapped = attempt(lambda: by_map_shards(directory, workers))
        skipped = attempt(lambda: by_loader(directory, workers, "skip")) if skip else None
        ok = verify_says_ok(directory, workers=max(1, workers))
    whole = expected(original)
    want = whole if want == "all" else want
    for got in (manifest, loaded, mapped, skipped):
        if isinstance(got, UserError):
            assert_one_line(got, *names)
    if want is ANY:
        if not isinstance(loaded, UserError) and loaded[0] != whole:
            CASES["read otherwise (only shards verify tells)"] += 1
    else:
        if not isinstance(loaded, UserError):
            assert loaded[0] == want and loaded[1] == 0, "the loader misread the set without an error"
        if not isinstance(mapped, UserError):
            assert mapped == want, "map_shards misread the set without an error"
        if skipped is not None and not isinstance(skipped, UserError) and skipped[1] == 0:
            assert skipped[0] == want, "the loader (on_corrupt=skip) misread the set without a word"
    refused = [isinstance(r, UserError) for r in (manifest, loaded, mapped)]
    lost = skipped is not None and (isinstance(skipped, UserError) or skipped[1] > 0)
    if ok:
        assert not any(refused) and not lost, "shards verify says OK about a set a reader refuses or skips"
        assert loaded[0] == whole, "shards verify says OK about a set that is not the one written"
    return {"manifest": manifest, "loader": loaded, "map": mapped, "skip": skipped, "verify": ok}


def test_the_undamaged_set_reads_as_written(base):
    directory, original = base
    result = check(directory, original, ("",))
    assert result["verify"] and not isinstance(result["loader"], UserError)
    result = check(directory, original, ("",), workers=2, skip=False)
    assert result["verify"] and result["map"] == expected(original)


# ---- manifest.json

ODD = [0, -1, 1, 2**63, 10**30, 1.5, float("nan"), float("inf"), True, None, "", "5", "x", [], [1], [-1, 5], ["a"],
       {}, {"a": 1}, [[]]]


def json_paths(tree, prefix=()):
    """The path of every value below the top of a JSON tree."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for key, value in items:
        yield prefix + (key,)
        yield from json_paths(value, prefix + (key,))


def at(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def odd_name(draw, directory: Path, data: dict, shard: int) -> str:
    """A shard name that is not a plain file of the set; where a careless reader would find a real
    shard there, one is put there."""
    real = directory / data["shards"][shard]["name"]
    kind = draw(st.sampled_from(["parent", "absolute", "subfolder", "folder", "duplicate", "", ".", "..", "nul",
                                 "slash"]))
    if kind == "parent":
        shutil.copy(real, directory.parent / real.name)
        return f"../{real.name}"
    if kind == "absolute":
        shutil.copy(real, directory.parent / "elsewhere.tar")
        return str(directory.parent / "elsewhere.tar")
    if kind == "subfolder":
        (directory / "sub").mkdir(exist_ok=True)
        shutil.copy(real, directory / "sub" / real.name)
        return f"sub/{real.name}"
    if kind == "folder":
        (directory / "folder.tar").mkdir()
        return "folder.tar"
    if kind == "duplicate":
        return data["shards"][(shard + 1) % len(data["shards"])]["name"]
    return {"nul": real.name + "\0x", "slash": real.name + "/"}.get(kind, kind)


def mutate_manifest(draw, directory: Path) -> str:
    """One structural change to the manifest; returns its kind."""
    path = directory / MANIFEST
    data = json.loads(path.read_text())
    shards = data["shards"]
    kind = draw(st.sampled_from(["drop key", "odd value", "shard name", "sample count", "shard list", "histogram"]))
    i = draw(st.integers(0, len(shards) - 1))
    if kind == "drop key":
        where = draw(st.sampled_from(list(json_paths(data))))
        parent = at(data, where[:-1])
        del parent[where[-1]]
    elif kind == "odd value":
        where = draw(st.sampled_from(list(json_paths(data))))
        at(data, where[:-1])[where[-1]] = draw(st.sampled_from(ODD))
    elif kind == "shard name":
        shards[i]["name"] = odd_name(draw, directory, data, i)
    elif kind == "sample count":
        n = shards[i]["samples"]
        shards[i]["samples"] = draw(st.sampled_from([0, n - 1, n + 1, 2 * n, -1, 10**12]))
    elif kind == "shard list":
        how = draw(st.sampled_from(["drop", "repeat", "swap", "reverse"]))
        if how == "drop":
            del shards[i]
        elif how == "repeat":
            shards.insert(i, dict(shards[i]))
        elif how == "swap":
            j = (i + 1) % len(shards)
            shards[i], shards[j] = shards[j], shards[i]
        else:
            shards.reverse()
    else:
        which = draw(st.sampled_from(["class_histogram", "unlabelled", "classes"]))
        if which == "class_histogram":
            c = draw(st.integers(0, CLASSES - 1))
            data[which][c] += draw(st.sampled_from([-1, 1]))
        elif which == "unlabelled":
            data[which] += draw(st.sampled_from([-1, 1]))
        else:
            data[which] = data[which][:-1] if draw(st.booleans()) else data[which] + ["extra"]
    path.write_text(json.dumps(data))  # NaN and Infinity are written as Python's json writes them
    return kind


@settings(max_examples=150, **SEEDED)
@given(data=st.data())
def test_a_changed_manifest_is_read_as_written_or_refused_in_one_line(base, data):
    directory, original = base
    with copy_of(directory) as copy:
        kind = mutate_manifest(data.draw, copy)
        CASES[f"manifest: {kind}"] += 1
        manifest = attempt(lambda: Manifest.load(copy))
        check(copy, original, (str(copy),), want=described(original, manifest))
        if not isinstance(manifest, UserError):
            names = [s.name for s in manifest.shards]
            assert not any(n in ("", ".", "..") or "/" in n or "\0" in n for n in names), \
                "a shard name outside the set was taken"


def mutate_bytes(draw, data: bytes) -> tuple[str, bytes]:
    kind = draw(st.sampled_from(["cut", "bit flip", "insert", "not UTF-8"]))
    at_ = draw(st.integers(0, len(data) - 1))
    if kind == "cut":
        return kind, data[:at_]
    if kind == "bit flip":
        return kind, data[:at_] + bytes([data[at_] ^ (1 << draw(st.integers(0, 7)))]) + data[at_ + 1:]
    if kind == "insert":
        return kind, data[:at_] + draw(st.binary(min_size=1, max_size=8)) + data[at_:]
    return kind, data[:at_] + b"\xe9\xff" + data[at_:]  # not UTF-8


@settings(max_examples=60, **SEEDED)
@given(data=st.data())
def test_changed_manifest_bytes_are_read_as_written_or_refused_in_one_line(base, data):
    directory, original = base
    with copy_of(directory) as copy:
        kind, damaged = mutate_bytes(data.draw, (copy / MANIFEST).read_bytes())
        (copy / MANIFEST).write_bytes(damaged)
        CASES[f"manifest bytes: {kind}"] += 1
        check(copy, original, (str(copy),), want=described(original, attempt(lambda: Manifest.load(copy))))


# ---- tar shards

def tar_members(path: Path) -> list[tuple[int, int, int, str]]:
    """(first header, data start, end of the padded data, name) of every member, as Python's tarfile sees them."""
    with tarfile.open(path) as tf:
        return [(m.offset, m.offset_data, m.offset_data + -(-m.size // 512) * 512, m.name) for m in tf]


def fix_checksum(data: bytearray, header: int) -> None:
    data[header + 148:header + 156] = b" " * 8
    data[header + 148:header + 156] = b"%06o\0 " % sum(data[header:header + 512])


def without_index(directory: Path) -> None:
    """The manifest as another tool writes it: no stored index, so readers walk the tar headers."""
    data = json.loads((directory / MANIFEST).read_text())
    for entry in data["shards"]:
        entry["index"] = []
        entry.pop("index_sha256", None)
    (directory / MANIFEST).write_text(json.dumps(data))


SIZES = [b"77777777777\0", b"\x80" + b"\xff" * 11, b"-0000001000\0", b"zzzzzzzzzzz\0", b"00000000000\0", b"1_000\0",
         b" 12\0", b"+1000\0"]
FLAGS = [b"x", b"L", b"g", b"5", b"2", b"K", b"1", b"\xff"]
PAX = [b"0 path=x\n", b"-5 path=x\n", b"14 size=-99999\n", b"9 size=x\n", b"99 path=x\n", b"3 a", b"x"]


def mutate_tar(draw, path: Path, indexed: bool) -> tuple[str, bool]:
    """One kind of damage to a shard, in place; returns its kind, and whether a reader can tell it
    from the shard: not when the result is a sound tar of other content that only the manifest's
    sha256 tells apart (which the readers do not check: it costs a read of the whole shard), i.e.
    a label digit changed, or headers changed with their checksums made to fit, in a shard read by
    walking its headers; nor two members swapped in a shard read through its index."""
    data = bytearray(path.read_bytes())
    members = tar_members(path)
    kind = draw(st.sampled_from(["cut", "bit flip", "swap", "size field", "header checksum", "zero blocks",
                                 "type flag", "pax record"]))
    first, start, end, _ = members[draw(st.integers(0, len(members) - 1))]
    header, telling = start - 512, True
    if kind == "cut":
        del data[draw(st.integers(0, len(data) - 1)):]
    elif kind == "bit flip":
        at_ = draw(st.integers(0, len(data) - 1))
        data[at_] ^= 1 << draw(st.integers(0, 7))
        telling = indexed or not any(s <= at_ < e and n.endswith(".cls") for _, s, e, n in members)
    elif kind == "swap":
        i, j = sorted(draw(st.lists(st.integers(0, len(members) - 1), min_size=2, max_size=2, unique=True)))
        (a0, _, a1, _), (b0, _, b1, _) = members[i], members[j]
        data[a0:b1] = data[b0:b1] + data[a1:b0] + data[a0:a1]
        telling = not indexed
    elif kind in ("size field", "type flag"):
        if kind == "size field":
            data[header + 124:header + 136] = draw(st.sampled_from(SIZES)).ljust(12, b"\0")
        else:
            data[header + 156:header + 157] = draw(st.sampled_from(FLAGS))
        if draw(st.booleans()):
            fix_checksum(data, header)
            telling = indexed
    elif kind == "header checksum":
        data[header + 148:header + 156] = draw(st.sampled_from([b"0000000\0", b"\0" * 8, b"zzzzzzz\0"]))
    elif kind == "zero blocks":
        at_ = draw(st.integers(0, len(data) // 512 - 1)) * 512
        data[at_:at_ + 512 * draw(st.integers(1, 3))] = bytes(512 * 3)[:len(data[at_:at_ + 512 * 3])]
    else:  # a pax header's records (the long keys' members have one)
        pax = next((f for f, s, _, _ in members if s - f == 1536), None)
        if pax is None:
            return "pax record (none in this shard)", True
        record = draw(st.sampled_from(PAX) | st.binary(max_size=30))
        data[pax + 512:pax + 1024] = record.ljust(512, b"\0")
        data[pax + 124:pax + 136] = b"%011o\0" % len(record)
        fix_checksum(data, pax)
        telling = indexed
    path.write_bytes(bytes(data))
    return kind, telling


@settings(max_examples=250, **SEEDED)
@given(data=st.data())
def test_a_damaged_shard_reads_as_written_or_is_named_in_one_line(base, data):
    directory, original = base
    with copy_of(directory) as copy:
        indexed = data.draw(st.booleans())
        if not indexed:
            without_index(copy)
        name = data.draw(st.sampled_from(sorted(original.shards)))
        kind, telling = mutate_tar(data.draw, copy / name, indexed)
        CASES[f"tar, {'with' if indexed else 'without'} index: {kind}"] += 1
        result = check(copy, original, (name,), want="all" if telling else ANY)
        with deadline(60):
            bank = attempt(lambda: by_bank(copy))
        if isinstance(bank, UserError):
            assert_one_line(bank, name, "labelled.txt")
            assert not result["verify"], "shards verify says OK about a set whose labelled images cannot be read"
        elif telling or result["verify"]:
            assert bank == [s for s in expected(original) if s[1] >= 0], "the labelled images were misread"


# ---- the `__index__` member

def rewrite_index(directory: Path, name: str, payload: bytes) -> None:
    """Replace a shard's index member by `payload` and make the manifest fit the new bytes (sizes,
    checksums, where the index lies), as a writer with a bug in its index would leave a set."""
    path = directory / name
    data, (first, start, _, _) = path.read_bytes(), tar_members(path)[-1]
    header = bytearray(data[first:first + 512])
    header[124:136] = b"%011o\0" % len(payload)
    fix_checksum(header, 0)
    shard = data[:first] + bytes(header) + payload + bytes(-len(payload) % 512) + bytes(1024)
    path.write_bytes(shard)
    manifest = json.loads((directory / MANIFEST).read_text())
    entry = next(e for e in manifest["shards"] if e["name"] == name)
    entry.update(bytes=len(shard), sha256=hashlib.sha256(shard).hexdigest(), index=[start, start + len(payload)])
    if "index_sha256" in entry:
        entry["index_sha256"] = hashlib.sha256(payload).hexdigest()
    (directory / MANIFEST).write_text(json.dumps(manifest))


def npy(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=allow_pickle)
    return buf.getvalue()


def changed_index(draw, index: np.ndarray) -> tuple[str, bytes]:
    kind = draw(st.sampled_from(["drop column", "column type", "rows", "label", "span", "shape", "npy header",
                                 "not npy"]))
    names = list(index.dtype.names)
    if kind == "npy header":  # the text that says the array's type and shape
        payload = bytearray(npy(index))
        payload[draw(st.integers(0, 127))] ^= 1 << draw(st.integers(0, 7))
        return kind, bytes(payload)
    if kind == "drop column":
        return kind, npy(index[[n for n in names if n != draw(st.sampled_from(names))]])
    if kind == "column type":
        column = draw(st.sampled_from(names))
        kinds = {"key": ["S16", "i8", "U2"], "label": ["f8", "U4", "u1", "i2"]}.get(column, ["f8", ("i8", (3,)), "i8"])
        new = np.zeros(len(index), dtype=[(n, draw(st.sampled_from(kinds)) if n == column else index.dtype[n])
                                          for n in names])
        for n in names:
            with contextlib.suppress(ValueError, TypeError):
                new[n] = index[n] if n != column else index[n].astype(new.dtype[n])
        return kind, npy(new)
    rows = index.copy()
    i, j = draw(st.integers(0, len(rows) - 1)), draw(st.integers(0, len(rows) - 1))
    if kind == "rows":
        how = draw(st.sampled_from(["drop", "repeat", "swap keys", "swap labels", "empty"]))
        if how in ("drop", "repeat", "empty"):
            rows = {"drop": np.delete(rows, i), "repeat": np.insert(rows, i, rows[j]), "empty": rows[:0]}[how]
        else:
            column = "key" if how == "swap keys" else "label"
            rows[column][[i, j]] = rows[column][[j, i]]
        return f"rows: {how}", npy(rows)
    if kind == "label":
        rows["label"][i] = draw(st.integers(-5, 10) | st.just(2**62))
        return kind, npy(rows)
    if kind == "span":
        column = draw(st.sampled_from([n for n in names if n.startswith("span:")]))
        rows[column][i, draw(st.integers(0, 1))] += draw(st.sampled_from([-2048, -512, -1, 1, 512, 10**9]))
        return kind, npy(rows)
    if kind == "shape":
        shaped = [rows[0], rows.reshape(1, -1), rows["label"], np.array(rows, dtype=object)]
        return kind, npy(draw(st.sampled_from(shaped)), allow_pickle=True)
    return kind, draw(st.binary(max_size=200))


@settings(max_examples=120, **SEEDED)
@given(data=st.data())
def test_a_damaged_or_rewritten_index_member_is_read_past_or_named_in_one_line(base, data):
    """Damage in place (a bit flip: the manifest's checksum of the index tells) must never misread;
    an index rewritten with checksums to fit (a writer's bug) must never crash a reader, and
    `shards verify` must tell it from the samples."""
    directory, original = base
    with copy_of(directory) as copy:
        name = data.draw(st.sampled_from(sorted(original.shards)))
        entry = next(e for e in Manifest.load(copy).shards if e.name == name)
        if data.draw(st.booleans()):
            shard = bytearray((copy / name).read_bytes())
            shard[data.draw(st.integers(entry.index[0], entry.index[1] - 1))] ^= 1 << data.draw(st.integers(0, 7))
            (copy / name).write_bytes(bytes(shard))
            kind, want = "bit flip", "all"
        else:
            stored = np.load(io.BytesIO((copy / name).read_bytes()[entry.index[0]:entry.index[1]]))
            kind, payload = changed_index(data.draw, stored)
            rewrite_index(copy, name, payload)
            kind, want = f"rewritten, {kind}", ANY
        CASES[f"index: {kind}"] += 1
        check(copy, original, (name,), want=want)


# ---- labelled-subset lists

LINES = st.one_of(st.sampled_from(sorted(KEYS[0] + KEYS[2])), st.sampled_from(["# a comment", "", "   ", "s99999",
                                                                              "s00001.png", " s00003 ", "s00001\r",
                                                                              UNLABELLED]),
                  st.text(max_size=12))


@settings(max_examples=120, **SEEDED)
@given(lines=st.lists(LINES, max_size=8), newline=st.sampled_from(["\n", "\r\n"]),
       damage=st.sampled_from(["none", "BOM", "not UTF-8", "huge line", "NUL"]))
def test_a_labelled_list_gives_its_keys_or_one_line_naming_the_file(base, lines, newline, damage):
    directory, original = base
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "labelled.txt"
        text = newline.join(lines).encode()
        text = {"BOM": b"\xef\xbb\xbf" + text, "not UTF-8": text + b"\ns0000\xe9", "NUL": text + b"\ns00000\0",
                "huge line": text + b"\n" + b"x" * 10**6}.get(damage, text)
        path.write_bytes(text)
        CASES[f"labelled list: {damage}"] += 1
        with deadline(60):
            bank = attempt(lambda: LabelledBank.from_subset(directory, path))
        if isinstance(bank, UserError):
            assert_one_line(bank, str(path), str(directory))
            assert len(str(bank)) < 1000, f"a one-line error of {len(str(bank))} characters"
            return
        listed = [line.strip() for line in text.decode("utf-8-sig").splitlines()]
        listed = [k for k in listed if k and not k.startswith("#")]
        assert sorted(listed) == bank.keys, "the bank holds other keys than the list names"
        for key, label, image in zip(bank.keys, bank.labels.tolist(), bank.images):
            assert (label, image.numpy().tobytes()) == original[key]


# ---- pseudo-label sets (a sidecar per shard, a manifest)

@pytest.fixture(scope="module")
def labels_base(base, tmp_path_factory):
    """A finished pseudo-label set for the base set, made as the stage makes it, and its labels."""
    directory, _ = base
    out = tmp_path_factory.mktemp("labels") / "pseudo_labels"
    out.mkdir()
    manifest, sidecars = Manifest.load(directory), []
    for i, entry in enumerate(manifest.shards):
        keys = KEYS[i]
        probs = torch.softmax(torch.randn(len(keys), CLASSES, generator=torch.Generator().manual_seed(i)), 1)
        write_sidecar(out, entry.name, entry.sha256, "classifier-id", keys, probs)
        sidecars.append(json.loads((out / sidecar_name(entry.name)).read_text()))
    summary = summarise(sidecars, CLASSES, PseudoLabel(threshold=0.3), None)
    (out / LABELS_MANIFEST).write_text(json.dumps({"format": LABELS_FORMAT, "classifier": "classifier-id",
                                                   "shards": [e.name for e in manifest.shards], **summary}))
    return out, {k: l for side in sidecars for k, l in zip(side["keys"], side["labels"])}


def pseudo_readers(directory: Path) -> dict:
    return {"all": lambda: load_pseudo_labels(directory, only_selected=False),
            "selected": lambda: load_pseudo_labels(directory),
            "most confident": lambda: most_confident_per_class(directory, 1, set()),
            "sampler's plan": lambda: read_labels_manifest(directory)}


def as_written(directory: Path) -> dict | None:
    """What the files say, read naively: key -> label over the manifest's shards; None where that
    reading would be nonsense (lists of unequal length, labels that are not class indices, a key
    twice, a sidecar missing), so that a reader returning anything there misread."""
    try:
        manifest = json.loads((directory / LABELS_MANIFEST).read_bytes())
        classes = len(manifest["counts"])
        got, total = {}, 0
        for name in manifest["shards"]:
            side = json.loads((directory / sidecar_name(name)).read_bytes())
            keys, labels, confidence = side["keys"], side["labels"], side["confidence"]
            if not (len(keys) == len(labels) == len(confidence)) or side["shard"] != name:
                return None
            if not all(type(l) is int and 0 <= l < classes for l in labels) or \
                    not all(type(c) in (int, float) and 0 <= c <= 1 for c in confidence):
                return None
            got.update(zip(keys, labels))
            total += len(keys)
        return got if len(got) == total and all(isinstance(k, str) for k in got) else None
    except Exception:
        return None


def mutate_labels(draw, directory: Path) -> str:
    """One change to a pseudo-label set: its manifest or a sidecar, as JSON or as bytes."""
    names = sorted(p.name for p in directory.iterdir())
    path = directory / draw(st.sampled_from(names))
    what = "manifest" if path.name == LABELS_MANIFEST else "sidecar"
    kind = draw(st.sampled_from(["drop key", "odd value", "list length", "bytes", "gone", "rewritten"]))
    if kind == "gone":
        path.unlink()
        if draw(st.booleans()):
            path.mkdir()  # a folder in its place
        return f"{what}: gone"
    if kind == "bytes":
        kind, damaged = mutate_bytes(draw, path.read_bytes())
        path.write_bytes(damaged)
        return f"{what}: {kind}"
    data = json.loads(path.read_text())
    if kind == "rewritten":  # the same values, written otherwise: must read as before
        path.write_text(json.dumps(data, indent=draw(st.sampled_from([None, 2])), sort_keys=True))
        return f"{what}: rewritten"
    where = draw(st.sampled_from(list(json_paths(data))))
    if kind == "drop key":
        del at(data, where[:-1])[where[-1]]
    elif kind == "odd value":
        at(data, where[:-1])[where[-1]] = draw(st.sampled_from(ODD + [4, -2, "t00000", 0.5]))
    else:
        lists = [p for p in json_paths(data) if isinstance(at(data, p), list) and at(data, p)]
        values = at(data, draw(st.sampled_from(lists)))
        how = draw(st.sampled_from(["drop", "repeat"]))
        values.pop() if how == "drop" else values.append(values[-1])
    path.write_text(json.dumps(data))
    return f"{what}: {kind}"


@settings(max_examples=150, **SEEDED)
@given(data=st.data())
def test_a_damaged_pseudo_label_set_is_read_as_written_or_named_in_one_line(base, labels_base, data):
    directory, labels = labels_base
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "pseudo_labels"
        shutil.copytree(directory, copy)
        kind = mutate_labels(data.draw, copy)
        CASES[f"pseudo-labels, {kind}"] += 1
        want = as_written(copy)
        results = {name: attempt(read) for name, read in pseudo_readers(copy).items()}
        for name, result in results.items():
            if isinstance(result, UserError):
                assert_one_line(result, str(copy))
        if kind.endswith("rewritten"):
            assert results["all"] == labels, "the same values written otherwise read differently"
        if not isinstance(results["all"], UserError):
            assert want is not None, f"a set that reads as nonsense was taken: {kind}"
            assert results["all"] == want
            assert results["selected"].items() <= want.items()
        if not isinstance(results["most confident"], UserError):
            assert results["most confident"].items() <= (want or {}).items()
        for entry in Manifest.load(base[0]).shards:  # the stage's resume check never fails
            side = read_sidecar(copy, entry.name, CLASSES)
            assert side is None or isinstance(side["sha256"], str)


# ---- with DataLoader workers and a verify pool: the same outcomes

def cut_in_the_middle(copy: Path) -> str:
    path = copy / "part-000001.tar"
    path.write_bytes(path.read_bytes()[:7000])
    return path.name


def flip_in_an_image(copy: Path) -> str:
    path = copy / "part-000000.tar"
    _, start, _, _ = tar_members(path)[3]  # s00001.png
    data = bytearray(path.read_bytes())
    data[start + 60] ^= 0x10
    path.write_bytes(bytes(data))
    return path.name


def flip_in_the_index(copy: Path) -> str:
    entry = Manifest.load(copy).shards[2]
    data = bytearray((copy / entry.name).read_bytes())
    data[entry.index[1] - 3] ^= 0x01  # inside the last sample's spans
    (copy / entry.name).write_bytes(bytes(data))
    return entry.name


@pytest.mark.parametrize("damage", [cut_in_the_middle, flip_in_an_image, flip_in_the_index])
def test_damage_reads_the_same_with_worker_processes(base, damage):
    directory, original = base
    with copy_of(directory) as copy:
        name = damage(copy)
        CASES["with 2 workers"] += 1
        alone, two = check(copy, original, (name,)), check(copy, original, (name,), workers=2, skip=False)
        for reader in ("loader", "map", "verify"):
            same = str(alone[reader]) == str(two[reader]) if isinstance(alone[reader], UserError) else \
                alone[reader] == two[reader]
            assert same, f"{reader}: {alone[reader]} in-process, {two[reader]} with 2 workers"


# ---- each defect the fuzz found, pinned

def edit_manifest(copy: Path, change) -> None:
    data = json.loads((copy / MANIFEST).read_text())
    change(data)
    (copy / MANIFEST).write_text(json.dumps(data))


def refused(read) -> str:
    with deadline(30):
        error = attempt(read)
    assert isinstance(error, UserError), f"read without an error: {error!r:.200}"
    assert "\n" not in str(error)
    return str(error)


@pytest.mark.parametrize("where, value, problem", [
    (("shards", 0, "samples"), "5", "shards[0].samples must be a whole number of at least 0, got '5'"),
    (("shards", 1, "samples"), 10**12, "shards[1] lists 1000000000000 samples in"),  # the planner hung
    (("shards", 0, "name"), "../part-000000.tar", "is not the name of a file in the set's folder"),
    (("shards", 0, "name"), "/tmp/part-000000.tar", "is not the name of a file in the set's folder"),
    (("shards", 0, "name"), "part-000000.tar\0", "is not the name of a file in the set's folder"),
    (("shards", 1, "name"), "part-000000.tar", "shards[1].name 'part-000000.tar' is listed twice"),
    (("shards", 2, "index"), 7, "shards[2].index must be a list of whole numbers"),
    (("image", "channels"), 2, "image must name its field"),
    (("image", "size"), [10**30, 8], "image.size must be [height, width] of at most 65535"),
    (("index_every",), 0, "index_every must be a whole number of at least 1"),
    (("classes",), ["a"], "class_histogram has 4 counts for 1 classes"),
])
def test_manifest_values_no_writer_makes_are_refused_naming_the_key(base, where, value, problem):
    directory, _ = base
    with copy_of(directory) as copy:
        edit_manifest(copy, lambda data: at(data, where[:-1]).__setitem__(where[-1], value))
        (copy.parent / "part-000000.tar").write_bytes((copy / "part-000000.tar").read_bytes())  # found if looked for
        for read in (lambda: Manifest.load(copy), lambda: by_loader(copy), lambda: by_map_shards(copy)):
            message = refused(read)
            assert message.startswith(f"{copy / MANIFEST} is damaged (") and problem in message, message
        assert not verify_says_ok(copy)


def test_a_manifest_nested_past_the_parsers_depth_is_damaged(base):
    directory, _ = base
    with copy_of(directory) as copy:
        (copy / MANIFEST).write_text("[" * 100_000 + "]" * 100_000)
        assert "manifest.json is damaged (maximum recursion depth" in refused(lambda: Manifest.load(copy))


def verify_faults(directory: Path) -> str:
    """`shards verify`'s report of a damaged set (exit status 1)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["shards", "verify", str(directory)]) == 1
    return out.getvalue()


def test_a_folder_where_a_shard_should_be_is_named(base):
    directory, _ = base
    with copy_of(directory) as copy:
        (copy / "part-000001.tar").unlink()
        (copy / "part-000001.tar").mkdir()
        for read in (lambda: by_loader(copy), lambda: by_map_shards(copy)):
            assert "part-000001.tar: a folder where the manifest lists a shard" in refused(read)
        assert "FAULT part-000001.tar: a folder, not a shard" in verify_faults(copy)


def test_verify_faults_images_in_a_set_whose_manifest_describes_none(base):
    directory, _ = base
    with copy_of(directory) as copy:
        edit_manifest(copy, lambda data: data.__setitem__("image", None))
        assert "this shard set holds no images" in refused(lambda: by_loader(copy))
        assert "member 's00000.png': an image, but the manifest describes no images" in verify_faults(copy)


def test_a_shard_holding_more_samples_than_its_entry_says_is_refused(base):
    """It was read up to the manifest's count, with only a warning about its index."""
    directory, _ = base
    with copy_of(directory) as copy:
        edit_manifest(copy, lambda data: data["shards"][0].__setitem__("samples", 4))
        for read in (lambda: by_loader(copy), lambda: by_map_shards(copy)):
            assert "part-000000.tar holds 5 samples but the manifest lists 4" in refused(read)


def test_a_label_outside_the_classes_is_refused_naming_the_member(base):
    """A walked shard's `cls` digit turned into a class the set does not have went into the batch."""
    directory, _ = base
    with copy_of(directory) as copy:
        without_index(copy)
        path = copy / "part-000000.tar"
        _, start, _, _ = tar_members(path)[0]  # s00000.cls
        data = bytearray(path.read_bytes())
        data[start] = ord("9")
        path.write_bytes(bytes(data))
        for read in (lambda: by_loader(copy), lambda: by_map_shards(copy), lambda: by_bank(copy)):
            assert "part-000000.tar: member 's00000.cls' is not a class index below 4" in refused(read)


def test_a_flipped_bit_in_the_index_member_is_not_read_as_a_label(base, caplog):
    """Readers take labels from the index alone: a flip there read as another class, silently."""
    directory, original = base
    with copy_of(directory) as copy:
        entry = Manifest.load(copy).shards[0]
        data = bytearray((copy / entry.name).read_bytes())
        index = np.load(io.BytesIO(bytes(data[entry.index[0]:entry.index[1]])))
        at_ = entry.index[1] - index.nbytes + index.dtype.fields["label"][1]  # the first sample's label
        assert data[at_] == original["s00000"][0]
        data[at_] ^= 0x01
        (copy / entry.name).write_bytes(bytes(data))
        assert by_loader(copy)[0] == expected(original) and by_map_shards(copy) == expected(original)
        assert "its index member's sha256 differs from the manifest's (damaged)" in caplog.text
        assert not verify_says_ok(copy)


@pytest.mark.parametrize("payload", [b"", b"\x93NUMPY\x01\x00v\x00[" + b" " * 117 + b"\n",
                                     npy(np.zeros(4, dtype=[("key", "U6")])), npy(np.arange(4))])
def test_an_index_member_that_is_not_an_index_is_walked_around(base, payload):
    """An empty member (EOFError), a header numpy cannot parse (tokenize.TokenError), columns
    missing (ValueError) or a plain array (TypeError) each crashed the readers."""
    directory, original = base
    with copy_of(directory) as copy:
        rewrite_index(copy, "part-000002.tar", payload)
        assert by_loader(copy)[0] == expected(original) and by_map_shards(copy) == expected(original)
        assert not verify_says_ok(copy)


def header_edit(field: slice, value: bytes, checksum: bool = True, member: int = 1):
    """Set a field of member `member`'s header in part-000000.tar (its checksum made to fit, or not)."""
    def edit(copy: Path) -> Path:
        path = copy / "part-000000.tar"
        header = tar_members(path)[member][1] - 512
        data = bytearray(path.read_bytes())
        data[header + field.start:header + field.stop] = value.ljust(field.stop - field.start, b"\0")
        if checksum:
            fix_checksum(data, header)
        path.write_bytes(bytes(data))
        return path
    return edit


def pax_record(record: bytes):
    def edit(copy: Path) -> Path:
        path = copy / "part-000001.tar"
        first = tar_members(path)[0][0]
        data = bytearray(path.read_bytes())
        data[first + 512:first + 1024] = record.ljust(512, b"\0")
        data[first + 124:first + 136] = b"%011o\0" % len(record)
        fix_checksum(data, first)
        path.write_bytes(bytes(data))
        return path
    return edit


@pytest.mark.parametrize("damage, problem", [
    (header_edit(slice(124, 136), b"-0000001000"), "corrupt tar header"),  # the walk went back: a hang
    (pax_record(b"0 path=x\n"), "corrupt pax header"),  # a record of no length: a hang
    (header_edit(slice(148, 156), b"zzzzzzz", checksum=False), "corrupt tar header"),  # ValueError
    (header_edit(slice(0, 10), b"s\xe90000.cls", member=0), "'s\\xe90000' in a member name is not a line of UTF-8"),
    (header_edit(slice(0, 11), b"s00000\n.cls", member=0), "'s00000\\n' in a member name is not a line of UTF-8"),
    (header_edit(slice(156, 157), b"x", checksum=False, member=0), "corrupt tar header"),  # its label was lost
])
def test_a_damaged_header_in_a_walked_shard_is_named_in_one_line(base, damage, problem):
    directory, _ = base
    with copy_of(directory) as copy:
        without_index(copy)
        path = damage(copy)
        for read in (lambda: by_loader(copy), lambda: by_map_shards(copy)):
            message = refused(read)
            assert message.startswith(str(path)) and problem in message, message
        with deadline(30):
            assert not verify_says_ok(copy)


def test_a_labelled_list_that_is_not_utf8_or_lists_a_key_twice_is_one_line(base, tmp_path):
    directory, _ = base
    listed = tmp_path / "labelled.txt"
    listed.write_bytes("s00001\ns00003\ncaf\xe9\n".encode("latin-1"))
    assert refused(lambda: LabelledBank.from_subset(directory, listed)) == \
        f"{listed}: not UTF-8 text (byte 0xe9 at offset 17); save it as UTF-8"
    listed.write_text("s00001\n# again:\ns00001\n")
    assert refused(lambda: LabelledBank.from_subset(directory, listed)) == \
        f"{listed} lists ['s00001'] twice (lines 1 and 3); remove the duplicates"
    listed.write_bytes(b"\xef\xbb\xbfs00001\r\ns00003\r\n")  # as an editor on Windows saves it
    assert LabelledBank.from_subset(directory, listed).keys == ["s00001", "s00003"]
    listed.write_text("s00001\n" + "x" * 10**6 + "\n")
    assert len(refused(lambda: LabelledBank.from_subset(directory, listed))) < 400


def test_a_labelled_sample_whose_label_is_not_a_number_is_named(base):
    directory, _ = base
    with copy_of(directory) as copy:
        path = copy / "part-000000.tar"
        _, start, _, _ = tar_members(path)[2]  # s00001.cls
        data = bytearray(path.read_bytes())
        data[start] = ord("x")
        path.write_bytes(bytes(data))
        assert "part-000000.tar: member 's00001.cls' is not a class index below 4" in refused(lambda: by_bank(copy))


@pytest.mark.parametrize("where, problem", [("same", "is labelled twice"), ("other", "too")])
def test_a_key_labelled_twice_is_refused_naming_the_sidecar(labels_base, tmp_path, where, problem):
    """(A dict keeps the later label of a key silently.)"""
    copy = tmp_path / "pseudo_labels"
    shutil.copytree(labels_base[0], copy)
    first, second = sorted(copy.glob("*.labels.json"))[:2]
    side = json.loads(second.read_text())
    side["keys"][1] = side["keys"][0] if where == "same" else json.loads(first.read_text())["keys"][0]
    second.write_text(json.dumps(side))
    for read in (lambda: load_pseudo_labels(copy), lambda: most_confident_per_class(copy, 1, set())):
        error = attempt(read)
        assert isinstance(error, UserError), error
        assert f"{second.name} is damaged (key " in str(error) and problem in str(error), error
        assert_one_line(error, str(copy))
