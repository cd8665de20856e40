"""Reading raw corpora: files, directories, globs, installed Python sources, Hub datasets.

A source names where documents come from; :func:`expand` turns it into a sorted list
of files, :func:`raw_records` yields undecoded records with their file and line, and
:func:`parse_record` turns one into text or raises :class:`BadRecord` naming both.
Parsing is separate from reading so that worker processes can do it in parallel.

Formats:
- ``jsonl`` (``.jsonl``/``.json``): one JSON object per line, text in ``text_field``;
- ``text``: plain text, one document per blank-line-separated block;
- ``file``: a whole file is one document (source code);
- ``parquet`` (``.parquet``): through ``datasets``;
- Hugging Face Hub datasets (``hf://OWNER/NAME``), through ``datasets`` (needs network).

Local JSONL and text are read by hand rather than through ``datasets`` because
``datasets`` can neither name the line of a malformed record nor skip just that one.
"""

from __future__ import annotations

import fnmatch
import glob
import json
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hcx.errors import HcxError
from hcx.paths import resolve

PYTHON_SCHEME = "python://"  # python://stdlib: the installed Python standard library
HUB_SCHEME = "hf://"
CODE_SUFFIXES = {".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp", ".rs", ".go", ".java", ".js",
                 ".ts", ".sh", ".rb", ".kt", ".scala", ".swift", ".cu", ".lua", ".sql"}


class SourceError(HcxError, ValueError):
    """A source that cannot be read at all (no files, unknown format)."""


class BadRecord(HcxError, ValueError):
    """One record that cannot be used; ``reason`` is a short key for reports."""

    def __init__(self, where: str, reason: str, detail: str):
        super().__init__(f"{where}: {detail}")
        self.where, self.reason = where, reason


@dataclass(frozen=True)
class RawRecord:
    file: str
    line: int                 # 1-based line where the record starts (0 for Hub rows)
    data: bytes | dict[str, Any]
    fmt: str                  # how to parse ``data``: jsonl, text, file or rows (parsed)

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}" if self.line else self.file

    @property
    def size(self) -> int:
        """Input bytes (for rows already parsed, the UTF-8 size of their strings)."""
        if isinstance(self.data, dict):
            return sum(len(v.encode("utf-8", "replace")) for v in self.data.values()
                       if isinstance(v, str))
        return len(self.data)


def is_hub(path: str) -> bool:
    return path.startswith(HUB_SCHEME)


def _root(path: str) -> Path:
    if path.startswith(PYTHON_SCHEME):
        which = path[len(PYTHON_SCHEME):]
        if which != "stdlib":
            raise SourceError(f"{path}: only python://stdlib is known")
        return Path(sysconfig.get_paths()["stdlib"])
    return resolve(path)


def expand(path: str, include: str = "*", exclude: tuple[str, ...] | list[str] = ()) -> list[Path]:
    """The files of a source, sorted: a file, every file under a directory whose name
    matches ``include``, or a glob. ``exclude`` globs are matched against the path
    relative to the directory (e.g. ``test/*``, ``json/*``)."""
    root = _root(path)
    if any(ch in str(root) for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(str(root), recursive=True) if Path(p).is_file())
        # excludes are relative to the glob's fixed part: /data/*/x.jsonl -> /data
        base = Path(*[part for part in root.parts[:next(
            i for i, part in enumerate(root.parts) if any(ch in part for ch in "*?["))]])
    elif root.is_dir():
        files = sorted(p for p in root.rglob(include) if p.is_file())
        base = root
    elif root.is_file():
        return [root]
    else:
        raise SourceError(f"{path}: no such file or directory ({root})")
    if exclude:
        def excluded(p: Path) -> bool:
            rel = str(p.relative_to(base))
            return any(fnmatch.fnmatch(rel, pattern) for pattern in exclude)

        files = [p for p in files if not excluded(p)]
    if not files:
        raise SourceError(f"{path}: no files match (include {include!r}, exclude {list(exclude)})")
    return files


def detect_format(file: Path, language: str | None = None) -> str:
    suffix = file.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return "jsonl"
    if suffix == ".parquet":
        return "parquet"
    if suffix in CODE_SUFFIXES or language == "code":
        return "file"
    return "text"


def raw_records(file: Path, fmt: str, start: int = 0, end: int | None = None,
                first_line: int = 1) -> Iterator[RawRecord]:
    """Records of one file, undecoded. An empty data file is a bad record (line 1), so
    that it is reported or counted rather than silently contributing nothing.

    JSONL files may be read in pieces: the lines that start in bytes ``[start, end)``,
    where ``start`` is the beginning of line ``first_line`` (see :func:`jsonl_pieces`)."""
    name = str(file)
    if fmt == "parquet":
        yield from _parquet_records(file)
        return
    with file.open("rb") as f:
        if fmt == "file":
            data = f.read()
            yield RawRecord(name, 1, data, fmt)
            return
        if fmt == "jsonl":
            empty = start == 0
            f.seek(start)
            pos = start
            for lineno, line in enumerate(f, first_line):
                if end is not None and pos >= end:
                    break
                pos += len(line)
                if line.strip():
                    empty = False
                    yield RawRecord(name, lineno, line, fmt)
            if empty and (end is None or end >= file.stat().st_size):  # the whole file
                yield RawRecord(name, 1, b"", fmt)
            return
        if fmt != "text":
            raise SourceError(f"{file}: unknown format {fmt!r} (jsonl, text, file, parquet)")
        block: list[bytes] = []
        start, lineno, empty = 1, 0, True
        for lineno, line in enumerate(f, 1):
            if line.strip():
                if not block:
                    start = lineno
                block.append(line)
            elif block:
                empty = False
                yield RawRecord(name, start, b"".join(block), fmt)
                block = []
        if block:
            empty = False
            yield RawRecord(name, start, b"".join(block), fmt)
        if empty:
            yield RawRecord(name, 1, b"", fmt)


def _rows(name: str, what: str, load) -> Iterator[RawRecord]:
    """Rows from ``datasets``, with its errors (corrupt file, network) naming the source;
    no rows at all is an empty file."""
    rows = 0
    try:
        for row in load():
            yield RawRecord(f"{name} row {rows}", 0, row, "rows")
            rows += 1
    except Exception as e:  # noqa: BLE001 - pyarrow, fsspec, HTTP errors alike
        no_rows = rows == 0 and "BatchSize must be greater than 0" in str(e)  # pyarrow's way
        if not no_rows:
            raise SourceError(f"{name}: cannot read {what} (row {rows}): "
                              f"{type(e).__name__}: {e}") from None
    if rows == 0:
        yield RawRecord(name, 1, b"", "rows")


def _parquet_records(file: Path) -> Iterator[RawRecord]:
    import datasets

    yield from _rows(str(file), "Parquet", lambda: datasets.load_dataset(
        "parquet", data_files=str(file), split="train", streaming=True))


def hub_records(dataset_id: str, config: str | None, split: str) -> Iterator[RawRecord]:
    """Rows of a Hugging Face Hub dataset, streamed (needs network access)."""
    import datasets

    yield from _rows(f"hf://{dataset_id} {split}", "the Hub dataset", lambda: datasets.load_dataset(
        dataset_id, config, split=split, streaming=True))


def jsonl_pieces(file: Path, piece_bytes: int) -> list[tuple[int, int, int]]:
    """``(start, end, first_line)`` pieces of about ``piece_bytes`` each that cut a JSONL
    file at line boundaries (one pass counting newlines, so every piece knows the
    number of its first line for error messages)."""
    size = file.stat().st_size
    pieces, start, line = [], 0, 1
    with file.open("rb") as f:
        while start < size:
            f.seek(min(start + piece_bytes, size))
            if f.tell() < size:
                f.readline()  # to the end of the line the cut falls in
            end = f.tell()
            f.seek(start)
            newlines, left = 0, end - start
            while left > 0:
                block = f.read(min(left, 1 << 22))
                newlines += block.count(b"\n")
                left -= len(block)
            pieces.append((start, end, line))
            start, line = end, line + newlines
    return pieces or [(0, 0, 1)]


def iter_records(path: str, include: str = "*", exclude: tuple[str, ...] | list[str] = (),
                 fmt: str = "auto", language: str | None = None, hub_config: str | None = None,
                 hub_split: str = "train") -> Iterator[RawRecord]:
    """Every record of a source: a Hub dataset (``hf://``) or the files :func:`expand`
    finds, each read in its format (``auto``: from its suffix and the language)."""
    if is_hub(path):
        yield from hub_records(path[len(HUB_SCHEME):], hub_config, hub_split)
        return
    for file in expand(path, include, exclude):
        yield from raw_records(file, fmt if fmt != "auto" else detect_format(file, language))


def _decode(record: RawRecord) -> str:
    if not record.data.strip():
        raise BadRecord(record.where, "empty", "empty file")
    try:
        return record.data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRecord(record.where, "invalid_utf8",
                        f"invalid UTF-8 (byte {e.start} of the record: {e.reason})") from None


def parse_object(record: RawRecord) -> dict[str, Any]:
    """A JSONL line or a Parquet/Hub row as a dict, or :class:`BadRecord`."""
    if isinstance(record.data, dict):
        return record.data
    if record.fmt != "jsonl":
        raise BadRecord(record.where, "not_json", f"expected JSON records, not {record.fmt}")
    text = _decode(record)
    if record.line == 1:
        text = text.lstrip("\ufeff")  # a byte-order mark (files written on Windows)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadRecord(record.where, "malformed_json", f"malformed JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise BadRecord(record.where, "missing_field",
                        f"expected a JSON object, got {type(obj).__name__}")
    return obj


def parse_record(record: RawRecord, text_field: str = "text") -> str:
    """The text of a record, or :class:`BadRecord` naming the file and line."""
    if isinstance(record.data, bytes) and record.fmt != "jsonl":
        if not record.data.strip() and record.fmt == "file":
            return ""  # an empty source file (``__init__.py``) is normal, not bad input
        return _decode(record)
    obj = parse_object(record)
    if text_field not in obj:
        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise BadRecord(record.where, "missing_field", f"no field {text_field!r} (has {keys})")
    value = obj[text_field]
    if not isinstance(value, str):
        raise BadRecord(record.where, "missing_field",
                        f"field {text_field!r} is {type(value).__name__}, not a string")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:  # JSON may escape half of a UTF-16 pair: "\ud800"
            raise BadRecord(record.where, "invalid_utf8",
                            f"field {text_field!r} holds an unpaired surrogate "
                            f"{value[e.start]!r} at character {e.start}") from None
    return value


def source_records(source) -> Iterator[RawRecord]:
    """Every record of a recipe's raw ``data.sources`` entry (a
    :class:`hcx.config.DataSource` with ``path``), read as its options say."""
    return iter_records(source.path, include=source.include, exclude=source.exclude,
                        fmt=source.format, hub_config=source.hub_config,
                        hub_split=source.hub_split)


def read_sources(sources, read, seed: int, what: str, log, weighted: bool = True) -> list:
    """What ``read(source)`` returns for every raw source (SFT conversations, preference
    examples, prompts), each source repeated by its ``weight`` when ``weighted``: 2.0 =
    twice per epoch, 0.5 = a seeded half. ``what`` names the items in the log and in the
    error for a prepared ``prefix`` source, which holds token ids, not records."""
    import random

    rng = random.Random(seed)
    out: list = []
    for i, source in enumerate(sources):
        if source.path is None:
            raise SourceError(f"data.sources[{i}] ({source.name}): {what} are read from "
                              "'path' (JSONL, Parquet or hf://), not a prepared 'prefix'")
        items = read(source)
        if weighted:
            whole, frac = divmod(source.weight, 1.0)
            picked = items * int(whole) + rng.sample(items, round(frac * len(items)))
            log(f"{source.name}: {len(items):,} {what}, {len(picked):,} per epoch")
        else:
            picked = items
            log(f"{source.name}: {len(items):,} {what}")
        out += picked
    return out


def raw_source_errors(sources, what: str) -> list[tuple[str, str]]:
    """Recipe problems for stages that read records (not prepared token ids)."""
    return [(f"data.sources.{i}.prefix", f"data.sources[{i}] ({s.name}): {what} are read "
             "from 'path' (JSONL, Parquet or hf://), not a prepared 'prefix'")
            for i, s in enumerate(sources) if s.path is None]
