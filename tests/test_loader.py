"""The shard loader: equal work per rank, a fixed order per (seed, epoch), exact mid-epoch resume,
and the damaged-data policies."""
from itertools import islice

import numpy as np
import pytest
import torch

from dpt_scale.errors import ShardError, UserError
from dpt_scale.shards.loader import ShardLoader
from dpt_scale.shards.manifest import Manifest
from dpt_scale.shards.plan import EpochPlan
from helpers import jpeg, loader_settings


def keys(loader, epoch=0, offset=0):
    return [k for batch in loader.epoch(epoch, offset) for k in batch["key"]]


@pytest.mark.parametrize("counts, batch, world, streams", [
    ([7, 31, 3, 50, 19], 4, 3, 5), ([7, 31, 3, 50, 19], 1, 2, 1), ([100], 8, 4, 24),
    ([1, 1, 1, 1, 1, 1, 1, 97], 5, 2, 3), ([10] * 9, 7, 5, 2)])
@pytest.mark.parametrize("drop_last", [True, False])
def test_plans_give_every_rank_the_same_work_and_each_sample_once(counts, batch, world, streams, drop_last):
    for epoch in range(3):
        plans = [EpochPlan(counts, batch_size=batch, world_size=world, rank=r, seed=5, epoch=epoch,
                           drop_last=drop_last, streams=streams) for r in range(world)]
        assert len({p.samples for p in plans}) == 1 and len({p.num_batches for p in plans}) == 1
        taken = [(seg.shard, i) for p in plans for v in range(streams) for seg in p.segments(v)
                 for i in range(seg.start, seg.stop)]
        assert len(taken) == len(set(taken)) == plans[0].samples * world  # no sample twice
        assert sum(counts) - len(taken) < world * (batch if drop_last else 1)  # few sit out
        for p in plans:
            per_stream = [sum(s.stop - s.start for s in p.segments(v)) for v in range(streams)]
            assert per_stream == [sum(p.batch_len(j) for j in range(v, p.num_batches, streams)) for v in range(streams)]


def test_an_epoch_reads_every_sample_once(uneven_set):
    loader = ShardLoader(uneven_set, batch_size=5, drop_last=False, world_size=1, rank=0,
                         settings=loader_settings(streams=8))
    got = keys(loader)
    assert sorted(got) == [f"s{i:05d}" for i in range(110)]
    batch = next(iter(loader.epoch(0)))
    assert batch["image"].shape == (5, 1, 8, 8) and batch["image"].dtype == torch.uint8
    assert [int(k[1:]) % 4 for k in batch["key"]] == batch["cls"].tolist()  # labels travel with keys


@pytest.mark.filterwarnings("ignore:This DataLoader will create 4 worker processes")
def test_order_is_fixed_by_seed_and_epoch_not_by_workers(uneven_set):
    def loader(seed, workers=0):
        return ShardLoader(uneven_set, batch_size=4, world_size=1, rank=0, seed=seed,
                           settings=loader_settings(workers=workers, streams=4, shuffle_buffer=64))

    reference = keys(loader(3))
    assert keys(loader(3)) == reference
    assert keys(loader(3, workers=2)) == reference
    assert keys(loader(3, workers=4)) == reference
    assert keys(loader(3), epoch=1) != reference
    assert keys(loader(4)) != reference
    assert sorted(reference) != reference  # actually shuffled


@pytest.mark.parametrize("workers", [0, 2])
def test_offset_resumes_exactly_where_the_epoch_stopped(uneven_set, workers):
    loader = ShardLoader(uneven_set, batch_size=4, seed=1, world_size=2, rank=1,
                         settings=loader_settings(streams=4, workers=workers))
    full = keys(loader, epoch=2)
    for done in (1, 3, 6, len(full) // 4):
        assert keys(loader, epoch=2, offset=4 * done) == full[4 * done:]
    with pytest.raises(UserError, match="multiple of the batch size"):
        keys(loader, epoch=2, offset=3)
    with pytest.raises(UserError, match="at most"):
        next(loader.batches(epoch=2, offset=4 * len(loader) + 4))
    # a checkpoint taken at the very end of an epoch resumes at the start of the next
    assert next(loader.batches(epoch=2, offset=4 * len(loader)))["key"] == keys(loader, epoch=3)[:4]


def test_random_transforms_repeat_on_resume(uneven_set):
    noisy = lambda image: image.float() + torch.rand(image.shape)  # noqa: E731
    loader = ShardLoader(uneven_set, batch_size=4, seed=1, transform=noisy, world_size=1, rank=0,
                         settings=loader_settings(streams=2))
    full = [b["image"] for b in loader.epoch(0)]
    resumed = [b["image"] for b in loader.epoch(0, offset=8)]
    assert all(torch.equal(a, b) for a, b in zip(full[2:], resumed))
    assert not torch.equal(full[0], full[1])
    for workers in (0, 2):  # loading, in-process or with workers, leaves the caller's RNG alone
        state = torch.get_rng_state()
        list(ShardLoader(uneven_set, batch_size=4, seed=1, transform=noisy, world_size=1, rank=0,
                         settings=loader_settings(streams=2, workers=workers)).epoch(0))
        assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_run_on_across_epochs_in_the_same_order(uneven_set, workers):
    loader = ShardLoader(uneven_set, batch_size=4, seed=2, world_size=1, rank=0,
                         settings=loader_settings(streams=2, workers=workers))
    per_epoch = len(loader)
    endless = list(islice(loader.batches(1, offset=8), 2 * per_epoch))
    assert [(b["epoch"], b["index"]) for b in endless] == (
        [(1, j) for j in range(2, per_epoch)] + [(2, j) for j in range(per_epoch)] + [(3, 0), (3, 1)])
    assert [k for b in endless[:per_epoch - 2] for k in b["key"]] == keys(loader, 1, offset=8)
    assert [k for b in endless[per_epoch - 2:2 * per_epoch - 2] for k in b["key"]] == keys(loader, 2)


@pytest.mark.parametrize("workers", [1, 2])
def test_small_batches_handed_over_several_at_a_time_keep_the_order_and_resume(uneven_set, workers):
    """A worker hands small batches over 4 to a DataLoader item; items straddle epochs (27 batches
    an epoch) and a resume can start inside one, and the batches are still those read in-process."""
    base = dict(batch_size=4, seed=2, world_size=1, rank=0)
    loader = ShardLoader(uneven_set, **base, settings=loader_settings(workers=workers, streams=8))
    assert loader.bundle == 4
    reference = ShardLoader(uneven_set, **base, settings=loader_settings(streams=8))
    for epoch, offset in ((1, 0), (1, 4 * 3), (2, 4 * 26)):
        got = list(islice(loader.batches(epoch, offset), 2 * len(loader)))
        want = list(islice(reference.batches(epoch, offset), 2 * len(loader)))
        assert [(b["epoch"], b["index"], b["key"]) for b in got] == [(b["epoch"], b["index"], b["key"]) for b in want]
        assert all(torch.equal(a["image"], b["image"]) and torch.equal(a["cls"], b["cls"]) for a, b in zip(got, want))


def test_shards_without_a_usable_index_are_walked_to_the_same_batches(uneven_set, caplog):
    def batches(workers=0):
        loader = ShardLoader(uneven_set, batch_size=4, seed=3, world_size=1, rank=0,
                             settings=loader_settings(streams=4, workers=workers))
        return [(b["key"], b["cls"].tolist(), b["image"].clone()) for b in loader.epoch(1)]

    def same(a, b):
        return len(a) == len(b) and all(x[:2] == y[:2] and torch.equal(x[2], y[2]) for x, y in zip(a, b))

    reference = batches()
    manifest = Manifest.load(uneven_set)
    assert all(e.index for e in manifest.shards)  # our writer stores one in every shard
    for entry in manifest.shards:  # as in a set written by another tool, or before indexes
        entry.index = []
    manifest.save(uneven_set)
    assert same(batches(), reference) and same(batches(workers=2), reference)
    for entry in manifest.shards:  # a manifest that no longer matches its shards
        entry.index = [1024, 1536]
    manifest.save(uneven_set)
    assert same(batches(), reference)
    assert "index member is not where it says" in caplog.text and "walking its headers" in caplog.text


def test_a_spurious_ast_error_while_reading_an_index_does_not_stop_the_epoch(uneven_set, monkeypatch):
    """CPython 3.11 can raise SystemError("AST constructor recursion depth mismatch") from the
    literal_eval with which numpy parses a .npy header (python/cpython#106905; it once killed a
    DataLoader worker here). The index is read again instead of ending the run."""
    import numpy as np

    reference = [b["key"] for b in ShardLoader(uneven_set, batch_size=4, world_size=1, rank=0,
                                               settings=loader_settings()).epoch(0)]
    real_load, failures = np.load, iter([True, False, True])

    def flaky_load(*args, **kwargs):
        if next(failures, False):
            raise SystemError("AST constructor recursion depth mismatch (before=201, after=222)")
        return real_load(*args, **kwargs)

    monkeypatch.setattr(np, "load", flaky_load)
    assert [b["key"] for b in ShardLoader(uneven_set, batch_size=4, world_size=1, rank=0,
                                          settings=loader_settings()).epoch(0)] == reference


def test_shards_kept_between_epochs_change_nothing_when_few_are_kept(uneven_set, monkeypatch):
    import dpt_scale.shards.shard_cache as shard_cache

    loader = ShardLoader(uneven_set, batch_size=4, seed=5, world_size=1, rank=0, settings=loader_settings(streams=2))
    reference = [b["key"] for b in islice(loader.batches(0), 3 * len(loader))]
    monkeypatch.setattr(shard_cache, "SHARDS_KEPT", 1)  # rows rebuilt and shards reopened when read again
    assert [b["key"] for b in islice(loader.batches(0), 3 * len(loader))] == reference


def test_impossible_settings_are_clear_errors(uneven_set):
    with pytest.raises(UserError, match="too few for 4 rank"):
        ShardLoader(uneven_set, batch_size=64, world_size=4, rank=0, settings=loader_settings())
    with pytest.raises(UserError, match="3 dataloader workers do not divide 4 streams"):
        ShardLoader(uneven_set, batch_size=4, world_size=1, rank=0, settings=loader_settings(streams=4, workers=3))
    with pytest.raises(UserError, match="rank 2 is not one of world size 2's ranks 0..1"):
        ShardLoader(uneven_set, batch_size=4, world_size=2, rank=2, settings=loader_settings())
    with pytest.raises(ShardError, match="not a complete shard set"):
        ShardLoader(uneven_set.parent, batch_size=4, world_size=1, rank=0, settings=loader_settings())


def damage(shard_set, shard_index, how):
    """Damage one shard: 'truncate' it mid-way, 'flip' a byte of an image, or delete ('missing') it."""
    path = shard_set / Manifest.load(shard_set).shards[shard_index].name
    data = bytearray(path.read_bytes())
    if how == "missing":
        path.unlink()
    elif how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "flip":
        data[1024 + 512 + 60] ^= 0xFF  # inside the first sample's PNG
        path.write_bytes(data)
    return path


@pytest.mark.parametrize("how, fragment", [("truncate", "truncated"), ("flip", "does not decode"),
                                           ("missing", "shard is missing")])
def test_damage_stops_the_epoch_naming_shard_and_member(uneven_set, how, fragment):
    path = damage(uneven_set, 3, how)
    for workers in (0, 2):
        loader = ShardLoader(uneven_set, batch_size=4, world_size=1, rank=0,
                             settings=loader_settings(streams=2, workers=workers))
        with pytest.raises(ShardError) as info:
            keys(loader)
        message = str(info.value)
        assert str(path) in message and fragment in message and "\n" not in message
        if how == "flip":
            assert "member 's00041.png'" in message  # shard 3 starts at sample 41


def test_a_list_of_images_decodes_as_one_by_one_and_no_damaged_png_reaches_libpng():
    """`decode_images` checks a list's PNGs before decoding any of them; libpng would crash the
    process on the damaged one instead of raising."""
    from dpt_scale.shards.decode import ImageDecodeError, decode_image, decode_images
    from helpers import png

    blobs = [png(i, size=6, channels=3) for i in range(5)] + [jpeg(5, 6, "RGB")]
    for channels in (1, 3):
        assert all(torch.equal(a, decode_image(b, channels)) for a, b in zip(decode_images(blobs, channels), blobs))
    damaged = bytearray(blobs[3])
    damaged[41] ^= 0xFF  # the first byte of the IDAT chunk's compressed data
    with pytest.raises(ImageDecodeError, match="damaged PNG"):
        decode_images(blobs[:3] + [bytes(damaged)] + blobs[4:], 1)


@pytest.mark.parametrize("how", ["truncate", "flip", "missing"])
def test_skip_policy_replaces_losses_counts_them_and_keeps_ranks_in_step(uneven_set, how, caplog):
    from dpt_scale.shards.tar import iter_samples

    path = damage(uneven_set, 3, how)
    readable = 0
    if how == "truncate":
        with pytest.raises(ShardError):
            for _ in iter_samples(path):
                readable += 1
    expected_lost = {"truncate": 50 - readable, "flip": 1, "missing": 50}[how]
    for workers in (0, 2):  # one rank, 110 = 22 x 5: every sample is planned, so every loss shows
        loader = ShardLoader(uneven_set, batch_size=5, drop_last=False, world_size=1, rank=0,
                             settings=loader_settings(streams=2, workers=workers, on_corrupt="skip"))
        batches = list(loader.epoch(0))
        assert len(batches) == len(loader) == 22 and all(len(b["key"]) == 5 for b in batches)
        assert loader.lost == expected_lost
    assert "replaced by repeats" in caplog.text and "verify" in caplog.text
    for rank in (0, 1):  # two ranks still get the same, full batches
        loader = ShardLoader(uneven_set, batch_size=4, world_size=2, rank=rank,
                             settings=loader_settings(streams=2, on_corrupt="skip"))
        assert [len(b["key"]) for b in loader.epoch(0)] == [4] * len(loader) == [4] * 13


def test_json_field_is_delivered_when_asked(tmp_path):
    from dpt_scale.shards.writer import ShardSetWriter
    from helpers import png

    with ShardSetWriter(tmp_path, classes=["a"]) as w:
        for i in range(4):
            w.write({"__key__": f"k{i}", "png": png(i), "cls": 0, "json": {"seed": i}}, (1, 8, 8))
    loader = ShardLoader(tmp_path, batch_size=4, shuffle=False, with_json=True, world_size=1, rank=0,
                         settings=loader_settings())
    assert next(iter(loader.epoch(0)))["json"] == [{"seed": i} for i in range(4)]


def test_images_of_different_sizes_need_a_transform(tmp_path):
    from dpt_scale.shards.writer import ShardSetWriter
    from helpers import png

    # 16 of one size, then 16 of another: the loader gathers 16 at a time, so no gathered group is
    # mixed and only the batch as a whole tells.
    sizes = [8] * 16 + [12] * 16
    with ShardSetWriter(tmp_path, classes=["a"]) as w:
        for i, size in enumerate(sizes):
            w.write({"__key__": f"k{i:02d}", "png": png(i, size), "cls": 0}, (1, size, size))
    with pytest.raises(UserError, match="different shapes"):
        keys(ShardLoader(tmp_path, batch_size=32, shuffle=False, world_size=1, rank=0, settings=loader_settings()))
    crop = lambda image: image[:, :8, :8]  # noqa: E731
    assert len(keys(ShardLoader(tmp_path, batch_size=4, transform=crop, world_size=1, rank=0,
                                settings=loader_settings()))) == 32


@pytest.mark.parametrize("workers", [0, 2])
def test_reused_batch_buffers_never_overwrite_batches_still_held(uneven_set, workers):
    """Batch memory is recycled, but only once nothing refers to it: keeping whole batches, or only
    NumPy views of them, keeps their contents."""
    from dpt_scale.shards.decode import decode_image
    from dpt_scale.shards.tar import iter_samples

    by_key = {s["__key__"]: decode_image(s["png"], 1) for e in Manifest.load(uneven_set).shards
              for s in iter_samples(uneven_set / e.name)}
    loader = ShardLoader(uneven_set, batch_size=4, world_size=1, rank=0,
                         settings=loader_settings(streams=2, workers=workers))
    kept = list(islice(loader.batches(0), 3 * len(loader)))  # every batch held at once
    arrays = [(b["key"], b["image"].numpy()) for b in islice(loader.batches(0), 3 * len(loader))]
    for batch_keys, images in [(b["key"], b["image"]) for b in kept] + arrays:
        assert all(torch.equal(torch.as_tensor(image), by_key[k]) for k, image in zip(batch_keys, images))


@pytest.mark.parametrize("workers", [0, 2])
def test_batch_buffers_are_recycled_when_dropped(uneven_set, workers):
    loader = ShardLoader(uneven_set, batch_size=4, world_size=1, rank=0,
                         settings=loader_settings(streams=2, workers=workers))
    addresses = {b["image"].data_ptr() for b in islice(loader.batches(0), 40)}
    assert len(addresses) <= 4 * max(workers, 1)  # a few buffers per worker serve all 40 batches


@pytest.mark.parametrize("workers", [0, 2])
def test_rgb_batches_come_channels_last_with_exact_pixels(tmp_path, workers):
    from dpt_scale.shards.decode import decode_image
    from dpt_scale.shards.writer import ShardSetWriter
    from helpers import png

    with ShardSetWriter(tmp_path, classes=["a"], max_samples=5) as w:
        for i in range(12):
            w.write({"__key__": f"k{i:02d}", "png": png(i, size=6, channels=3), "cls": 0}, (3, 6, 6))
    loader = ShardLoader(tmp_path, batch_size=4, world_size=1, rank=0,
                         settings=loader_settings(streams=2, workers=workers))
    for batch in loader.epoch(0):
        assert batch["image"].shape == (4, 3, 6, 6)
        assert batch["image"].is_contiguous(memory_format=torch.channels_last)
        for key, image in zip(batch["key"], batch["image"]):
            assert torch.equal(image, decode_image(png(int(key[1:]), size=6, channels=3), 3))


def test_a_slow_consumer_always_sees_each_batch_as_decoded(uneven_set):
    """Workers run ahead into recycled buffers while the consumer is busy: a buffer must never be
    rewritten between leaving a worker and being dropped by the consumer."""
    import time

    from dpt_scale.shards.decode import decode_image
    from dpt_scale.shards.tar import iter_samples

    by_key = {s["__key__"]: decode_image(s["png"], 1) for e in Manifest.load(uneven_set).shards
              for s in iter_samples(uneven_set / e.name)}
    loader = ShardLoader(uneven_set, batch_size=4, world_size=1, rank=0, settings=loader_settings(streams=2, workers=2))
    for batch in islice(loader.batches(0), 40):
        time.sleep(0.02)  # the workers fill their next buffers meanwhile
        assert all(torch.equal(image, by_key[k]) for k, image in zip(batch["key"], batch["image"]))


def test_jpeg_of_another_size_or_damaged_is_still_caught_in_place(tmp_path):
    from dpt_scale.shards.writer import ShardSetWriter

    def build(directory, odd):
        with ShardSetWriter(directory, classes=["a"], max_samples=100, image_field="jpg") as w:
            for i in range(8):
                w.write({"__key__": f"k{i}", "jpg": odd if i == 3 else jpeg(i, 16, "RGB"), "cls": 0}, (3, 16, 16))
        return ShardLoader(directory, batch_size=8, shuffle=False, world_size=1, rank=0, settings=loader_settings())

    with pytest.raises(UserError, match="different shapes"):
        next(iter(build(tmp_path / "size", jpeg(3, 24, "RGB")).epoch(0)))
    with pytest.raises(ShardError, match=r"k3\.jpg' does not decode"):
        next(iter(build(tmp_path / "cut", jpeg(3, 16, "RGB")[:200]).epoch(0)))


def _png_in_mode(i: int, size: int, mode: str) -> bytes:
    """A PNG of random pixels seeded by `i`, saved by PIL in colour mode `mode`."""
    import io

    from PIL import Image

    rng = np.random.default_rng(i)
    image = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    if mode == "P+tRNS":
        image = image.convert("P")
    else:
        image = image.convert(mode)
    buf = io.BytesIO()
    image.save(buf, format="PNG", **({"transparency": 3} if mode == "P+tRNS" else {}))
    return buf.getvalue()


PNG_MODES = ["L", "RGB", "P", "P+tRNS", "1", "LA", "RGBA", "L"]


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("fmt", ["jpg", "png"])
def test_batches_hold_the_pixels_torchvision_decodes(tmp_path, fmt, workers, channels):
    """Same-size JPEGs (simplejpeg) and 8-bit PNGs of the set's colour mode (libspng) are decoded
    straight into the batch, the rest (PNGs with alpha or of the other colour mode) through
    torchvision: every pixel as torchvision's decoder gives, except a CMYK JPEG, which simplejpeg
    converts by another formula (within one level)."""
    from torchvision.io import ImageReadMode

    from dpt_scale.shards.decode import decode_image
    from dpt_scale.shards.writer import ShardSetWriter

    def encoded(i: int) -> bytes:
        if fmt == "jpg":
            return jpeg(i, 16, "CMYK" if i == 5 else "RGB")
        return _png_in_mode(i, 16, PNG_MODES[i % len(PNG_MODES)])

    blobs = {f"k{i:02d}": encoded(i) for i in range(16)}
    with ShardSetWriter(tmp_path, classes=["a"], max_samples=5, image_field=fmt) as w:
        for key, data in blobs.items():
            w.write({"__key__": key, fmt: data, "cls": 0}, (channels, 16, 16))
    loader = ShardLoader(tmp_path, batch_size=4, world_size=1, rank=0,
                         settings=loader_settings(streams=2, workers=workers))
    assert loader.in_place == (channels, 16, 16)
    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    seen = set()
    for batch in loader.epoch(0):
        for key, image in zip(batch["key"], batch["image"]):
            expected = torch.ops.image.decode_image(torch.frombuffer(bytearray(blobs[key]), dtype=torch.uint8),
                                                    mode.value, False)
            tolerance = 1 if (fmt, key) == ("jpg", "k05") else 0
            assert image.shape == expected.shape and (image.int() - expected.int()).abs().max() <= tolerance, key
            alone = decode_image(blobs[key], channels)  # the path with a transform: a tensor per image
            assert alone.shape == expected.shape and (alone.int() - expected.int()).abs().max() <= tolerance, key
            seen.add(key)
    assert len(seen) == 16


def test_a_png_that_libspng_would_misread_is_reported_as_damaged(tmp_path):
    """libspng decodes some flipped bits into wrong pixels without an error (~2% of single-bit
    flips in MNIST PNGs): the chunk CRCs are checked first, so such a sample is reported, never
    delivered."""
    import io

    import imagecodecs
    from PIL import Image

    from dpt_scale.shards.writer import ShardSetWriter

    def disc_png(i: int) -> bytes:  # a digit-like shape (random pixels compress too little to show it)
        y, x = np.mgrid[:16, :16]
        buf = io.BytesIO()
        Image.fromarray(((y - 8) ** 2 + (x - 8) ** 2 < 20 + i).astype(np.uint8) * 255).save(buf, format="PNG")
        return buf.getvalue()

    def misread(good: bytes):
        expected, out = imagecodecs.spng_decode(good), np.empty((16, 16), np.uint8)
        for at in range(41, len(good) - 16):  # the IDAT chunk's compressed data
            for bit in range(8):
                bad = bytearray(good)
                bad[at] ^= 1 << bit
                try:
                    if not np.array_equal(imagecodecs.spng_decode(bytes(bad), out=out), expected):
                        return bytes(bad)
                except RuntimeError:
                    pass
        pytest.fail("no silently misread flip found")

    with ShardSetWriter(tmp_path, classes=["a"], max_samples=100, image_field="png") as w:
        for i in range(8):
            w.write({"__key__": f"k{i}", "png": misread(disc_png(i)) if i == 3 else disc_png(i), "cls": 0},
                    (1, 16, 16))
    loader = ShardLoader(tmp_path, batch_size=8, shuffle=False, world_size=1, rank=0, settings=loader_settings())
    assert loader.in_place == (1, 16, 16)
    with pytest.raises(ShardError, match=r"k3\.png' does not decode \(damaged PNG"):
        next(iter(loader.epoch(0)))
