"""Reading tar shards made by other tools (img2dataset, LAION-style sets, webdataset's ShardWriter)
through webdataset: its URL syntax (brace ranges, `::` lists, `pipe:` commands, local paths, and
http(s) and the other schemes its gopen opens) and its tar iteration. Each sample's image and
label are picked out by field name (recipe: data.webdataset).

ShardReader runs in import worker processes, so it is a plain picklable object.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import webdataset as wds
from braceexpand import UnbalancedBracesError  # webdataset's brace expansion
from webdataset.gopen import Pipe
from webdataset.tariterators import group_by_keys, tar_file_expander

from dpt_scale.errors import UserError
from dpt_scale.recipe.schema import WebDatasetInput

UNLABELLED = "none"  # data.webdataset.label: import without labels
LABEL_FIX = "name the label with --label FIELD or FIELD:KEY (data.webdataset.label)"
# gopen reads http(s) with a silenced curl: its exit status is all it says
CURL_STATUS = {6: "the host name does not resolve", 7: "no connection could be made to the host",
               22: "the server answered with an HTTP error (e.g. 404)", 28: "the connection timed out"}
STOPPED_BY_US = (141, -13)  # SIGPIPE, through a shell or not: we stopped reading early


def expand_urls(patterns: list[str], named_by: str) -> list[str]:
    """Every shard URL the patterns name, in webdataset's syntax. A local file that does not exist
    is refused here, before any work; `named_by` says where the patterns came from."""
    urls = []
    for pattern in patterns:
        try:
            urls += wds.shardlists.expand_urls(pattern)
        except UnbalancedBracesError:
            raise UserError(f"malformed URL {pattern!r}, named by {named_by}: its braces do not pair up; write a "
                            "range of shards as data-{000000..000099}.tar") from None
    for url in urls:
        path = local_path(url)
        if path is not None and not os.path.isfile(path):
            raise UserError(f"input shard not found: {path}, named by {named_by}; give tar files, a brace range "
                            "(data-{000000..000099}.tar), a pipe: command or a URL")
    twice = [url for url, n in Counter(urls).items() if n > 1]
    if twice:
        raise UserError(f"input shard {twice[0]} is named more than once by {named_by}; name each shard once")
    return urls


def local_path(url: str) -> str | None:
    """The file a URL names on this machine, as gopen opens it; None for commands and remote URLs."""
    parsed = urlparse(url)
    if parsed.scheme == "":
        return url
    return url2pathname(parsed.path) if parsed.scheme == "file" else None


def version(url: str) -> str | None:
    """Size and modification time of a local shard (a resumed import redoes a shard replaced since);
    None where it cannot be known."""
    path = local_path(url)
    if path is None:
        return None
    stat = os.stat(path)
    return f"{stat.st_size}:{stat.st_mtime_ns}"


@dataclass
class ShardReader:
    image: tuple[str, ...]  # field alternatives: the first one a sample has holds its image
    label_field: str | None  # None: the samples are imported without labels
    label_key: str | None  # a dotted key path into the label field's JSON
    classes: tuple[str, ...] | None  # class names in index order; None: integer labels only
    names: dict[str, int] | None = None

    @classmethod
    def from_settings(cls, settings: WebDatasetInput) -> "ShardReader":
        image = tuple(f.strip().lower() for f in settings.image.split(";") if f.strip())
        if not image:
            raise UserError(f"data.webdataset.image {settings.image!r} names no field; give e.g. jpg;png;webp")
        classes = _read_classes(settings.classes)
        label = settings.label.strip()
        if label == UNLABELLED:
            if classes is not None:
                raise UserError("data.webdataset.classes is given but data.webdataset.label is none; name the field "
                                "that holds each sample's class (--label), or drop the class list")
            return cls(image, None, None, None)
        field, colon, key = label.partition(":")
        if not field.strip() or (colon and not key.strip()):
            raise UserError(f"data.webdataset.label {label!r} is not FIELD or FIELD:KEY; e.g. cls, txt or json:label")
        names = None if classes is None else {name: i for i, name in enumerate(classes)}
        return cls(image, field.strip().lower(), key.strip() or None, classes, names)

    @property
    def label(self) -> str:
        return self.label_field + (f":{self.label_key}" if self.label_key else "")

    def samples(self, url: str) -> Iterator[tuple[str, str, bytes, int | None]]:
        """(key, image field, image bytes, label) of every sample of the shard at `url`, in order."""
        source = _Input(url)
        try:
            samples = group_by_keys(tar_file_expander([{"url": url, "stream": source.stream}], eof_value=None))
            while True:
                try:
                    sample = next(samples, None)
                except Exception as exc:  # from the tar reader or the stream (a command that failed)
                    raise source.failure(exc) from None
                if sample is None:
                    break
                yield self._parse(sample, url)
            failed = source.failure(None)
            if failed is not None:
                raise failed
        finally:
            source.close()

    def _parse(self, sample: dict, url: str) -> tuple[str, str, bytes, int | None]:
        key = sample["__key__"]
        fields = ", ".join(sorted(k for k in sample if not k.startswith("__"))) or "none"
        field = next((f for f in self.image if f in sample), None)
        if field is None:
            raise UserError(f"{url}: sample '{key}' has no image field {';'.join(self.image)} (its fields: "
                            f"{fields}); name the image field with --image-field (data.webdataset.image)")
        if self.label_field is None:
            return key, field, sample[field], None
        where = f"{url}: sample '{key}'"
        if self.label_field not in sample:
            raise UserError(f"{where} has no label field '{self.label_field}' (its fields: {fields}); {LABEL_FIX}, "
                            "or import the samples without labels with --label none")
        raw = sample[self.label_field]
        if self.label_key is None:
            value = raw.decode("utf-8", "replace").strip()
        else:
            value = _json_value(raw, self.label_key, where, self.label_field)
        return key, field, sample[field], self._index(value, where)

    def _index(self, value, where: str) -> int:
        """A class index from a label value: an integer is the index, any other text a class name."""
        if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value):
            value = int(value)
        shown = _shown(value)
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise UserError(f"{where}: label {self.label} is {shown}, neither an integer class index nor a class name; "
                            f"{LABEL_FIX}")
        if isinstance(value, int):
            if value < 0:
                raise UserError(f"{where}: label {self.label} is {shown}, a negative class index; class indices "
                                "count from 0")
            if self.classes is not None and value >= len(self.classes):
                raise UserError(f"{where}: label {self.label} is {shown}, but data.webdataset.classes names only "
                                f"{len(self.classes)} classes (indices 0 to {len(self.classes) - 1}); complete the "
                                "class list")
            return value
        if self.names is None:
            raise UserError(f"{where}: label {self.label} is {shown}, not an integer class index; to import labels "
                            "given as class names, list the names in data.webdataset.classes (--classes FILE)")
        if value not in self.names:
            known = ", ".join(map(repr, self.classes[:3])) + (", ..." if len(self.classes) > 3 else "")
            raise UserError(f"{where}: label {self.label} is {shown}, which is not one of the {len(self.classes)} "
                            f"class names in data.webdataset.classes ({known}); add it there, or fix the sample")
        return self.names[value]


def _json_value(raw: bytes, path: str, where: str, field: str):
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise UserError(f"{where}: its '{field}' member is not JSON ({exc}); {LABEL_FIX}") from None
    for part in path.split("."):
        if not isinstance(value, dict) or value.get(part) is None:
            keys = ", ".join(sorted(map(str, value))[:8]) if isinstance(value, dict) else type(value).__name__
            raise UserError(f"{where} has no label: its '{field}' member has no '{path}' (it has: {keys or 'nothing'}"
                            f"); {LABEL_FIX}, or import the samples without labels with --label none")
        value = value[part]
    return value


def _shown(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _read_classes(classes: list[str] | str | None) -> tuple[str, ...] | None:
    """Class names in index order, from the recipe's list or from a text file (one per line)."""
    if classes is None:
        return None
    where = "data.webdataset.classes"
    if isinstance(classes, str):
        path, where = Path(classes), classes
        if not path.is_file():
            raise UserError(f"class list not found: {classes}; give a text file of class names, one per line "
                            "(--classes FILE, data.webdataset.classes)")
        try:
            classes = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError as exc:
            raise UserError(f"class list {path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    if not classes:
        raise UserError(f"{where} names no class; give the class names in index order, one per line")
    twice = [name for name, n in Counter(classes).items() if n > 1]
    if twice:
        raise UserError(f"{where}: class {twice[0]!r} is listed more than once; list each class once")
    return tuple(classes)


class _Input:
    """One input shard's bytes, and, when reading them fails, the reason in words. A `pipe:`
    command runs as gopen runs it (a shell; exit 141 when we stop reading early is no error), its
    stderr kept for the message instead of going to the user's terminal."""

    def __init__(self, url: str):
        self.url, self.errors = url, None
        try:
            if url.startswith("pipe:"):
                self.errors = tempfile.TemporaryFile()
                self.stream = Pipe(url[5:], mode="rb", shell=True, bufsize=8192, ignore_status=[141],
                                   stderr=self.errors)
            else:
                self.stream = wds.gopen(url)
        except Exception as exc:
            raise UserError(f"cannot open {url} ({exc}); check the URL") from None

    def failure(self, exc: Exception | None) -> UserError | None:
        """What went wrong, once reading stopped (`exc`: what the reader raised; None: it reached the end)."""
        if isinstance(self.stream, Pipe):
            if exc is None:
                while self.stream.stream.read(2**20):  # whatever follows the tar's end, so that the command can end
                    pass
            else:
                self.stream.stream.close()  # a command still writing gets SIGPIPE rather than being waited for
            status = self.stream.proc.wait()
            if status != 0 and not (exc is not None and status in STOPPED_BY_US):
                return UserError(self._command_failed(status))
        if exc is None:
            return None
        reason = exc.args[0] if exc.args else type(exc).__name__
        return UserError(f"{self.url} cannot be read as a tar shard ({reason}); check that it is a complete tar "
                         "file (re-create or download it again)")

    def _command_failed(self, status: int) -> str:
        if self.errors is None:  # a command gopen chose for the scheme: curl for http(s)
            program = self.stream.args[0][0]
            program = program[0] if isinstance(program, list) else program.split()[0]
            why = CURL_STATUS.get(status, f"{program} exit status {status}") if program == "curl" else \
                f"{program} exit status {status}"
            return f"cannot read {self.url}: {why}; check the URL and that this machine can reach it"
        self.errors.seek(0)
        lines = self.errors.read().decode("utf-8", "replace").strip().splitlines()
        said = f": {lines[-1].strip()}" if lines else ""
        return (f"the command of {self.url!r} failed (exit status {status}{said}); check that it runs in a shell and "
                "writes a tar file to its standard output")

    def close(self) -> None:
        try:
            self.stream.close()
        except Exception:  # a failed command's status was reported already
            pass
        if self.errors is not None:
            self.errors.close()
