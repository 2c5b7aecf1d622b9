"""The grain pipeline: shuffled documents, tokenized and packed into fixed-length rows.

This process's share of the documents is shuffled (seeded, reshuffled every epoch),
tokenized, and the token streams are packed into rows with grain's concat-then-split
packer:

    input_ids    int32 [B, T]
    segment_ids  int32 [B, T]  1, 2, 3, ... per document in the row; 0 is padding
    positions    int32 [B, T]  restart at 0 at every segment start

A document longer than the rest of a row continues in the next row as a new
segment (positions restart there too). Attention and targets never cross a segment
boundary, so packed documents never see each other. Everything is deterministic in
the seed, and the iterator's state (`get_state()` / `set_state()`, JSON) resumes it
exactly; the trainer's checkpoints save it with every checkpoint.

`--data synthetic` gives uniformly random tokens (one segment per row) for benchmarks.
"""

from __future__ import annotations

import json
from typing import Sequence

import grain
import grain.experimental as gex
import numpy as np

BATCH_FIELDS = ("input_ids", "segment_ids", "positions")


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
