"""`dpt-scale shards verify`: re-read a whole shard set and list every fault.

Per shard, in parallel: present, byte size and sha256 as in the manifest, every tar header's
checksum, every sample complete with a label in range, every image fully decodable by PIL (a
decoder independent of the loader's) with the manifest's channels and size, the sample count, and
the stored sample index (index.py) against the samples themselves.
Then across the set: duplicate keys, class histogram, stray shards and leftover temporaries.
"""
from __future__ import annotations

import hashlib
import io
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from dpt_scale.errors import ShardError
from dpt_scale.shards.index import INDEX_MEMBER, read_index, walk_index
from dpt_scale.shards.manifest import IMAGE_FIELDS, Manifest, ShardEntry
from dpt_scale.shards.tar import TarFormatError, iter_samples, open_map
from dpt_scale.shards.writer import TMP_SUFFIX


@dataclass
class Fault:
    shard: str
    member: str | None
    problem: str

    def __str__(self) -> str:
        return f"{self.shard}: " + (f"member '{self.member}': " if self.member else "") + self.problem


@dataclass
class ShardReport:
    entry: ShardEntry
    faults: list[Fault]
    keys: list[str]
    histogram: Counter


def verify(directory: str | Path, workers: int = 2) -> tuple[Manifest, list[ShardReport], list[Fault]]:
    """Returns the manifest, a report per shard and the faults of the set as a whole."""
    directory = Path(directory)
    manifest = Manifest.load(directory)
    jobs = [(directory, entry, manifest.image, manifest.num_classes, manifest.index_every) for entry in manifest.shards]
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(min(workers, len(jobs))) as pool:
            reports = list(pool.map(_verify_shard, jobs))
    else:
        reports = [_verify_shard(job) for job in jobs]

    faults = []
    seen: dict[str, str] = {}
    for report in reports:
        for key in report.keys:
            if key in seen:
                faults.append(Fault(report.entry.name, None, f"key '{key}' also appears in {seen[key]}"))
            else:
                seen[key] = report.entry.name
    histogram = sum((r.histogram for r in reports), Counter())
    counted = [histogram[c] for c in range(manifest.num_classes)]
    if all(not r.faults for r in reports) and counted != manifest.class_histogram:
        faults.append(Fault("manifest.json", None, "class histogram does not match the shards' labels"))
    listed = {e.name for e in manifest.shards}
    for path in sorted(directory.iterdir()):
        if path.suffix == ".tar" and path.name not in listed:
            faults.append(Fault(path.name, None, "not listed in the manifest (left from another run?)"))
        elif path.name.endswith(TMP_SUFFIX):
            faults.append(Fault(path.name, None, "temporary file of an interrupted write; delete it"))
    return manifest, reports, faults


def _verify_shard(job) -> ShardReport:
    directory, entry, image, num_classes, index_every = job
    path = directory / entry.name
    report = ShardReport(entry, [], [], Counter())
    fault = report.faults.append
    if not path.is_file():
        fault(Fault(entry.name, None, "a folder, not a shard" if path.is_dir() else "missing"))
        return report
    size = path.stat().st_size
    if size != entry.bytes:
        fault(Fault(entry.name, None, f"{size} bytes, manifest says {entry.bytes} (truncated or replaced)"))
    if _sha256(path) != entry.sha256:
        fault(Fault(entry.name, None, "sha256 differs from the manifest (content changed or damaged)"))
    count, offsets = 0, []
    try:
        for sample in iter_samples(path, check_headers=True):
            if count % index_every == 0:
                offsets.append(sample["__offset__"])
            count += 1
            report.keys.append(sample["__key__"])
            _check_sample(entry.name, sample, image, num_classes, report)
    except ShardError as exc:
        member = exc.member if isinstance(exc, TarFormatError) else None
        fault(Fault(entry.name, member, exc.reason if isinstance(exc, TarFormatError) else str(exc)))
    if count != entry.samples:
        fault(Fault(entry.name, None, f"{count} samples readable, manifest says {entry.samples}"))
    elif entry.offsets and entry.offsets != offsets:
        fault(Fault(entry.name, None, "sample offsets differ from the manifest's index"))
    elif entry.index:
        _check_index(path, entry, fault)
    return report


def _check_index(path: Path, entry: ShardEntry, fault) -> None:
    """The shard's stored sample index must say what walking the shard says."""
    mm, _ = open_map(str(path))
    with mm:
        try:
            stored = read_index(path, mm, entry.index, entry.samples, entry.index_sha256)
        except ShardError as exc:
            fault(Fault(entry.name, INDEX_MEMBER, str(exc).removeprefix(f"{path}: ")))
            return
        walked, _ = walk_index(path, mm)
        if stored.dtype != walked.dtype or not (stored == walked).all():
            fault(Fault(entry.name, INDEX_MEMBER, "the sample index differs from the samples (keys, labels or "
                                                  "member positions); re-create the shard set"))


def _check_sample(shard: str, sample: dict, image: dict | None, num_classes: int, report: ShardReport) -> None:
    key = sample["__key__"]
    fault = report.faults.append
    if "cls" in sample:
        try:
            label = int(sample["cls"])
            if not 0 <= label < num_classes:
                raise ValueError
            report.histogram[label] += 1
        except ValueError:
            fault(Fault(shard, f"{key}.cls", f"label {sample['cls'][:20]!r} is not a class index below {num_classes}"))
    if image is None:
        found = [ext for ext in IMAGE_FIELDS if ext in sample]
        if found:  # the readers of images refuse a set whose manifest describes none
            fault(Fault(shard, f"{key}.{found[0]}", "an image, but the manifest describes no images"))
        return
    field = image["field"]
    if field not in sample:
        fault(Fault(shard, key, f"sample has no .{field} image"))
        return
    try:
        with Image.open(io.BytesIO(sample[field])) as img:
            img.load()
            channels, (w, h) = len(img.getbands()), img.size
    except Exception as exc:  # PIL raises many types for damaged data
        fault(Fault(shard, f"{key}.{field}", f"does not decode ({type(exc).__name__}: {exc})"))
        return
    if channels != image["channels"]:
        fault(Fault(shard, f"{key}.{field}", f"{channels} channel(s), the set has {image['channels']}"))
    if image.get("size") and [h, w] != image["size"]:
        fault(Fault(shard, f"{key}.{field}", f"size {h}x{w}, the set has {image['size'][0]}x{image['size'][1]}"))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
