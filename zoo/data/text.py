"""Framing text as each kind of model expects it, and turning token rows into padded arrays.

Shared by the CLI (generate, eval), evaluation and fine-tuning, so that a model sees
the same framing at every stage.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from zoo import registry


def token_id(tokenizer, *pieces: str) -> int | None:
    """Id of the first of `pieces` the tokenizer's vocabulary holds, or None."""
    for piece in pieces:
        i = tokenizer.piece_id(piece)
        if i is not None:
            return int(i)
    return None


def decode_known(tokenizer, ids: Iterable[int]) -> str:
    """Text of the ids the tokenizer knows. A model's vocabulary may be larger than its tokenizer's
    (padded to a multiple of 128); ids past the tokenizer's are left out (sentencepiece raises on them)."""
    return tokenizer.decode([int(t) for t in ids if 0 <= int(t) < tokenizer.vocab_size])


def frame(tokenizer, cfg, text: str, max_len: int, *, role: str = "input") -> list[int]:
    """Token ids of `text` as the model's kind (zoo.registry) expects them, at most `max_len` long.

    Encoder inputs (BERT) are [CLS] text [SEP] (when the vocabulary has them; truncation
    keeps both); encoder-decoder inputs and targets (T5) end with the model's eos (as HF's
    T5 tokenizer adds); decoder inputs are the plain tokens.
    """
    ids = list(tokenizer.encode(text))
    kind = registry.of(cfg).kind
    if kind == "encoder" and role == "input":
        cls, sep = token_id(tokenizer, "[CLS]", "<s>"), token_id(tokenizer, "[SEP]", "</s>")
        head, tail = ([cls] if cls is not None else []), ([sep] if sep is not None else [])
        return head + ids[: max_len - len(head) - len(tail)] + tail
    if kind == "encoder-decoder":
        return ids[: max_len - 1] + [cfg.eos_token_id]
    return ids[:max_len]


def pad_rows(seqs: Sequence[Sequence[int]], length: int, rows: int | None = None):
    """Right-padded int32 rows: (ids [R, length], segment_ids [R, length], 1 on real tokens).

    `rows` pads the batch with empty rows (segment 0: no weight anywhere).
    """
    rows = len(seqs) if rows is None else rows
    ids = np.zeros((rows, length), np.int32)
    seg = np.zeros((rows, length), np.int32)
    for r, s in enumerate(seqs):
        s = list(s)[:length]
        ids[r, : len(s)] = s
        seg[r, : len(s)] = 1
    return ids, seg
