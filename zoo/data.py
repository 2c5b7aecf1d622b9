"""Data for training: document sources, tokenizers and the grain pipeline.

The pipeline reads documents (local text files, JSONL with a "text" field, or
ArrayRecord files of UTF-8 text / JSON records), keeps this process's share,
shuffles them (seeded, reshuffled every epoch), tokenizes, and packs the token
streams into fixed-length rows with grain's concat-then-split packer:

    input_ids    int32 [B, T]
    segment_ids  int32 [B, T]  1, 2, 3, ... per document in the row; 0 is padding
    positions    int32 [B, T]  restart at 0 at every segment start

A document longer than the rest of a row continues in the next row as a new
segment (positions restart there too). Attention and targets never cross a segment
boundary, so packed documents never see each other. Everything is deterministic in
the seed, and the iterator's state (`get_state()` / `set_state()`, JSON) resumes it
exactly; `zoo.checkpoint` saves it with every checkpoint.

`--data synthetic` gives uniformly random tokens (one segment per row) for benchmarks.
"""

from __future__ import annotations

import io
import json
import os
import sysconfig
import zlib
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst", ".py")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
ARRAY_RECORD_SUFFIXES = (".array_record", ".arrayrecord")
BATCH_FIELDS = ("input_ids", "segment_ids", "positions")
# The embedded corpus: the standard library's own sources, capped so that the
# tokenizer trains and an epoch fits the default run.
STDLIB = "stdlib"
STDLIB_MAX_BYTES = 3_000_000


# ----------------------------------------------------------------------------- sources


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


UTF8_BOM = b"\xef\xbb\xbf"


class DataError(ValueError):
    """A data file that cannot be used (empty, not UTF-8, a JSON record without text)."""


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


# -------------------------------------------------------------------------- tokenizers


class Tokenizer:
    """A sentencepiece `.model` or a Hugging Face `tokenizer.json` behind one interface."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        if self.path.endswith(".json"):
            from tokenizers import Tokenizer as HFTokenizer

            self._hf = HFTokenizer.from_file(self.path)
            self._sp = None
            self.vocab_size = self._hf.get_vocab_size(with_added_tokens=True)
            vocab = self._hf.get_vocab(with_added_tokens=True)
            eos = [vocab[t] for t in ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "[SEP]") if t in vocab]
            self.eos_id = eos[0] if eos else None
        else:
            import sentencepiece as spm

            self._sp = spm.SentencePieceProcessor(model_file=self.path)
            self._hf = None
            self.vocab_size = self._sp.get_piece_size()
            self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else None

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no special tokens added)."""
        if self._sp is not None:
            return self._sp.encode(text)
        return self._hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids."""
        ids = [int(i) for i in ids]
        if self._sp is not None:
            return self._sp.decode(ids)
        return self._hf.decode(ids)


def _training_chunks(source: Sequence[str], max_bytes: int, chunk_bytes: int = 2000) -> Iterator[str]:
    """Line-aligned chunks (newlines kept) of the first `max_bytes` of the corpus."""
    seen = 0
    for i in range(len(source)):
        buf = ""
        for line in source[i].splitlines(keepends=True):
            if buf and len(buf) + len(line) > chunk_bytes:
                yield buf
                buf = ""
            buf += line[: chunk_bytes * 2]
            seen += len(line)
        if buf:
            yield buf
        if seen >= max_bytes:
            return


def train_tokenizer(source: Sequence[str], out_path: str | os.PathLike, vocab_size: int,
                    max_bytes: int = 3_000_000) -> Tokenizer:
    """Trains a sentencepiece BPE model on (at most `max_bytes` of) the corpus; saves it at `out_path`.

    Whitespace is kept verbatim (identity normalisation, newline a piece of its own,
    byte fallback), so code and prose decode back exactly. Ids: pad 0, unk 1, bos 2,
    eos 3. The vocabulary may come out smaller than asked when the corpus is small.
    """
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=_training_chunks(source, max_bytes), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=False, allow_whitespace_only_pieces=True, byte_fallback=True, user_defined_symbols=["\n"],
        pad_id=0, unk_id=1, bos_id=2, eos_id=3, hard_vocab_limit=False, max_sentence_length=8192,
        input_sentence_size=50_000, shuffle_input_sentence=False, num_threads=max(1, min(4, os.cpu_count() or 1)),
        minloglevel=2,
    )
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(".tmp")
    tmp.write_bytes(model.getvalue())
    tmp.replace(out_path)  # atomic: a killed run never leaves half a tokenizer behind
    return Tokenizer(out_path)


# ---------------------------------------------------------------------------- pipeline


def restart_positions(segment_ids: np.ndarray) -> np.ndarray:
    """Positions 0, 1, ... restarting at every change of segment id along the last axis; 0 on padding."""
    t = segment_ids.shape[-1]
    idx = np.broadcast_to(np.arange(t), segment_ids.shape)
    change = np.ones(segment_ids.shape, bool)
    change[..., 1:] = segment_ids[..., 1:] != segment_ids[..., :-1]
    start = np.maximum.accumulate(np.where(change, idx, 0), axis=-1)
    return np.where(segment_ids > 0, idx - start, 0).astype(np.int32)


class _Tokenize:
    """Document text -> {"input_ids": int32 array}, with EOS appended. Picklable for workers."""

    def __init__(self, tokenizer, append_eos: bool = True):
        self.tokenizer = tokenizer
        self.eos = tokenizer.eos_id if append_eos else None

    def __call__(self, text: str) -> dict:
        ids = self.tokenizer.encode(text)
        if self.eos is not None:
            ids = list(ids) + [self.eos]
        return {"input_ids": np.asarray(ids, np.int32)}


def _finish_batch(batch: dict) -> dict:
    segment_ids = batch["input_ids_segment_ids"].astype(np.int32)
    return {
        "input_ids": np.where(segment_ids > 0, batch["input_ids"], 0).astype(np.int32),
        "segment_ids": segment_ids,
        "positions": restart_positions(segment_ids),
    }


def text_dataset(source: Sequence[str], tokenizer, *, seq_len: int, batch_size: int, seed: int,
                 process_index: int = 0, process_count: int = 1, shuffle: bool = True, shuffle_window: int = 128):
    """The grain pipeline: this process's documents, shuffled per epoch, tokenized, packed, batched.

    Packed rows are shuffled again in a window of `shuffle_window` rows, so the rows
    of one long document spread over several batches. `batch_size` is the per-process
    batch. Returns a `grain.IterDataset`; `iter()` of it has `get_state()` / `set_state()`.
    """
    import grain
    import grain.experimental as gex

    if len(source) < process_count:
        raise ValueError(f"{len(source)} documents cannot be split over {process_count} processes")
    ds = grain.MapDataset.source(source)[process_index::process_count]
    if shuffle:
        ds = ds.shuffle(seed=seed)  # reshuffled differently in every epoch of the repeat
    ds = ds.repeat(None).map(_Tokenize(tokenizer))
    packed = gex.ConcatThenSplitIterDataset(ds.to_iter_dataset(), length_struct={"input_ids": seq_len})
    if shuffle and shuffle_window > 1:
        packed = gex.WindowShuffleIterDataset(packed, window_size=shuffle_window, seed=seed + 1)
    return packed.batch(batch_size, drop_remainder=True).map(_finish_batch)


def _json_to_grain(state):
    """Undoes JSON's tuple -> list: grain's packer compares its remainder slices with tuples."""
    if isinstance(state, dict):
        return {k: _json_to_grain(v) for k, v in state.items()}
    if isinstance(state, list):
        return tuple(_json_to_grain(v) for v in state)
    return state


class DataIterator:
    """Iterates a grain dataset; its state is plain JSON and restores exactly (`zoo.checkpoint` stores it)."""

    def __init__(self, dataset):
        self._it = iter(dataset)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return next(self._it)

    def get_state(self) -> dict:
        return json.loads(json.dumps(self._it.get_state()))

    def set_state(self, state: dict) -> None:
        self._it.set_state(_json_to_grain(state))


class SyntheticIterator:
    """Uniform random tokens, one document per row, for benchmarks and tests.

    Row r of global batch k depends only on (seed, k, r), and a process yields the
    rows `process_index * batch_size ...` of each global batch: the global batch is
    the same whatever the number of processes (so a 2-host run sees the data a
    1-host run sees) and no process generates rows it does not use.
    """

    def __init__(self, *, vocab_size: int, seq_len: int, batch_size: int, seed: int, process_index: int = 0):
        self.vocab_size, self.seq_len, self.batch_size = vocab_size, seq_len, batch_size
        self.seed, self.process_index, self.step = seed, process_index, 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        first = self.process_index * self.batch_size
        ids = np.stack([np.random.default_rng([self.seed, self.step, r]).integers(0, self.vocab_size, self.seq_len,
                                                                                  dtype=np.int32)
                        for r in range(first, first + self.batch_size)])
        self.step += 1
        shape = (self.batch_size, self.seq_len)
        return {
            "input_ids": ids,
            "segment_ids": np.ones(shape, np.int32),
            "positions": np.broadcast_to(np.arange(self.seq_len, dtype=np.int32), shape).copy(),
        }

    def get_state(self) -> dict:
        return {"step": self.step}

    def set_state(self, state: dict) -> None:
        self.step = int(state["step"])
