"""Document sources: the files behind `--data`, read as documents without holding them in memory.

A document is one text file (or a line-aligned piece of a long one: `split_bytes`), one
JSONL line's "text", or one ArrayRecord record (UTF-8 text or a JSON record). The
embedded corpus `stdlib` is the standard library's own sources. Files that are empty,
not UTF-8 or JSON records without text are refused with a `DataError` naming file
and line. `read_jsonl` reads the supervised records of fine-tuning and evaluation.
"""

from __future__ import annotations

import json
import os
import sysconfig
import zlib
from pathlib import Path
from typing import Iterator, Sequence

TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst", ".py")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
ARRAY_RECORD_SUFFIXES = (".array_record", ".arrayrecord")
# The embedded corpus: the standard library's own sources, capped so that the
# tokenizer trains and an epoch fits the default run.
STDLIB = "stdlib"
STDLIB_MAX_BYTES = 3_000_000
UTF8_BOM = b"\xef\xbb\xbf"


class DataError(ValueError):
    """A data file that cannot be used (empty, not UTF-8, a JSON record without text)."""


def stdlib_files() -> list[Path]:
    """The standard library's .py files (tests and site-packages excluded) in a fixed order.

    The order is a hash of the relative path rather than the name, so that a byte cap
    keeps a spread of the whole library instead of the modules starting with "a".
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    files = [p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts)]
    return sorted(files, key=lambda p: (zlib.crc32(p.relative_to(root).as_posix().encode()), p.as_posix()))


def find_files(paths: Sequence[str], flag: str = "--data") -> list[Path]:
    """Expands files and directories (recursively, sorted) into data files; missing paths raise
    FileNotFoundError naming `flag`."""
    known = TEXT_SUFFIXES + JSONL_SUFFIXES + ARRAY_RECORD_SUFFIXES
    files: list[Path] = []
    for raw in paths:
        if raw == STDLIB:
            files.extend(stdlib_files())
            continue
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in known)
            if not found:
                raise FileNotFoundError(f"no data files ({', '.join(known)}) under {flag} directory {raw}")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{flag} path does not exist: {raw}")
    return files


def _line_chunks(path: str, split_bytes: int) -> Iterator[tuple[int, int]]:
    """Byte ranges of consecutive lines, each at most `split_bytes` (unless one line is longer).

    Every line is checked to be UTF-8 on the way (DataError names the byte offset).
    """
    start = end = 0
    with open(path, "rb") as fh:
        for line in fh:
            _check_utf8(path, line, end)
            if end > start and end + len(line) - start > split_bytes:
                yield start, end
                start = end
            end += len(line)
    if end > start:
        yield start, end


def _check_utf8(name: str, raw: bytes, offset: int = 0) -> None:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{name}: not UTF-8 text (bad byte 0x{raw[e.start]:02x} at byte offset {offset + e.start}); "
                        "convert it (e.g. iconv -t utf-8) or leave it out of --data") from None


def _check_jsonl_line(name: str, n: int, line: bytes, offset: int) -> str:
    """The record's text (DataError naming file:line when the line is not a record with one)."""
    _check_utf8(name, line, offset)
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{name}:{n}: not a JSON record ({e.msg})") from None
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise DataError(f"{name}:{n}: a JSON record needs a string 'text' field")
    return record["text"]


def _has_text(path: str) -> bool:
    """True once a byte other than whitespace turns up (a normal file answers in its first block)."""
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            if block.replace(UTF8_BOM, b"").strip():
                return True
    return False


def read_jsonl(path, fields: Sequence[str], locations: list | None = None) -> list[dict]:
    """Records of a JSONL file holding every one of `fields`; one clear DataError otherwise.

    Blank lines are skipped. Text fields must be strings; a "label" an integer. A
    `locations` list gets "path:line" appended for each record returned, so later checks
    (a label outside the training classes, ...) can name the line.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise DataError(f"data file does not exist: {path}")
    records = []
    with open(path, "rb") as fh:
        raw = fh.read()
    _check_utf8(path, raw)
    lines = raw.decode("utf-8-sig").split("\n")  # -sig: a leading byte-order mark is not part of the JSON
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{n}: expected a JSON object with fields {', '.join(fields)}")
        for field in fields:
            if field not in record:
                raise DataError(f"{path}:{n}: missing field {field!r} (needs {', '.join(fields)})")
            value = record[field]
            if field == "label":
                if isinstance(value, bool) or not isinstance(value, int):
                    raise DataError(f"{path}:{n}: label must be an integer class id, got {value!r}")
            elif not isinstance(value, str):
                raise DataError(f"{path}:{n}: field {field!r} must be a string, got {type(value).__name__}")
        records.append(record)
        if locations is not None:
            locations.append(f"{path}:{n}")
    if not records:
        raise DataError(f"{path}: no records (empty file)")
    return records


class DocumentSource:
    """Random access over documents: one per text file, JSONL line or ArrayRecord record.

    Holds only an index of (file, byte range) or (file, record) entries, so a large
    corpus is never held in memory. `max_bytes` stops indexing once that many bytes
    are covered (0: no cap). `split_bytes` cuts text files longer than that at line
    ends into documents of at most that size (a longer line stays whole), so that a
    shuffled batch mixes many files instead of consecutive rows of one long file;
    0 keeps files whole. JSONL and ArrayRecord records are never split.
    """

    def __init__(self, paths: Sequence[str], max_bytes: int = 0, split_bytes: int = 0):
        self.files = [str(p) for p in find_files(paths)]
        self.index: list[tuple[int, int, int]] = []  # (file number, start or record, end or -1)
        self._readers: dict[int, object] = {}
        # A user's file that is empty or not UTF-8 is refused (it is a mistake more often
        # than not); the embedded corpus has a few empty __init__.py files, skipped.
        embedded = {str(p) for p in stdlib_files()} if STDLIB in paths else set()
        total = 0
        for f, name in enumerate(self.files):
            if max_bytes and total >= max_bytes:
                break
            size = os.path.getsize(name)
            if not size:
                if name in embedded:
                    continue
                raise DataError(f"{name}: empty data file; remove it from --data")
            if name.endswith(ARRAY_RECORD_SUFFIXES):
                reader = self._array_record(f)
                for r in range(reader.num_records()):
                    self.index.append((f, r, -1))
                total += size
            elif name.endswith(JSONL_SUFFIXES):
                before = len(self.index)
                with open(name, "rb") as fh:
                    start = 0
                    for n, line in enumerate(fh, 1):
                        if n == 1 and line.startswith(UTF8_BOM):  # the record starts after the byte-order mark
                            start, line = len(UTF8_BOM), line[len(UTF8_BOM):]
                            total += start
                        # Records whose text is empty or blank carry nothing to learn: skipped.
                        if line.strip() and _check_jsonl_line(name, n, line, start).strip():
                            self.index.append((f, start, start + len(line)))
                        start += len(line)
                        total += len(line)
                        if max_bytes and total >= max_bytes:
                            break
                if len(self.index) == before:
                    raise DataError(f"no text in {name}: it holds no JSON record with a non-blank 'text'")
            else:
                if not _has_text(name):
                    if name in embedded:
                        continue
                    raise DataError(f"no text in {name}: it holds only whitespace; remove it from --data")
                chunks = list(_line_chunks(name, split_bytes or size))
                self.index.extend((f, a, b) for a, b in chunks)
                total += size

    def _array_record(self, f: int):
        if f not in self._readers:
            try:
                from array_record.python.array_record_module import ArrayRecordReader
            except ImportError:
                raise ImportError(f"{self.files[f]} is an ArrayRecord file but array_record is not installed") from None
            self._readers[f] = ArrayRecordReader(self.files[f])
        return self._readers[f]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> str:
        f, a, b = self.index[i]
        name = self.files[f]
        if b < 0:
            raw = self._array_record(f).read([a])[0]
        else:
            with open(name, "rb") as fh:
                fh.seek(a)
                raw = fh.read(b - a)
        if a == 0 and raw.startswith(UTF8_BOM):
            raw = raw[len(UTF8_BOM):]
        text = raw.decode("utf-8", errors="replace")
        if name.endswith(JSONL_SUFFIXES) or (b < 0 and text.lstrip().startswith("{")):
            record = json.loads(text)
            if "text" not in record:
                raise ValueError(f"{name}: JSON record {i} has no 'text' field")
            return record["text"]
        return text

    def __getstate__(self):  # readers hold open files; reopen lazily after pickling
        return {**self.__dict__, "_readers": {}}
