"""Eval tasks: running a model over examples for its metrics.

  * perplexity: exp(mean next-token NLL) of a causal LM over every predicted token of
    every document; documents longer than the window are cut into consecutive windows,
    and the first token of each window has no target;
  * class_logits: the logits of a sequence classifier (accuracy/F1 in zoo.eval.metrics);
  * generate_texts: greedy outputs of an encoder-decoder (BLEU/ROUGE in zoo.eval.metrics).

Batches have a fixed shape (filler rows pad the last one), so each task compiles once.
"""

from __future__ import annotations

from functools import partial
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from zoo import registry
from zoo.data.text import decode_known, pad_rows
from zoo.inference import generate
from zoo.objectives import cross_entropy_sums, next_token_targets
from zoo.pretrained import EvalError


def _batches(n: int, batch_size: int):
    return [(a, min(a + batch_size, n)) for a in range(0, n, batch_size)]


def _bar(total: int, desc: str, progress: bool):
    return tqdm(total=total, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)


@partial(jax.jit, static_argnums=0)
def _nll_rows(model, params, ids_BT, seg_BT):
    """Summed next-token NLL and target count of each row: ([B], [B])."""
    # one window per row, so positions simply count from 0
    positions_BT = jnp.broadcast_to(jnp.arange(ids_BT.shape[1], dtype=jnp.int32), ids_BT.shape)
    logits_BTV = model.apply({"params": params}, ids_BT, positions=positions_BT, segment_ids=seg_BT)
    targets_BT, valid_BT = next_token_targets(ids_BT, seg_BT)

    def row(logits_TV, targets_T, valid_T):
        _, sums = cross_entropy_sums(logits_TV[None], targets_T[None], valid_T[None])
        return sums["nll"], sums["weight"]

    return jax.vmap(row)(logits_BTV, targets_BT, valid_BT)


def windows(tokens: Sequence[int], length: int) -> list[list[int]]:
    """Consecutive non-overlapping windows of at most `length` tokens (those with a target: >= 2)."""
    out = [list(tokens[a:a + length]) for a in range(0, len(tokens), length)]
    return [w for w in out if len(w) >= 2]


def perplexity(model, params, documents: Iterable[Sequence[int]], *, seq_len: int, batch_size: int = 8,
               progress: bool = True, per_document: bool = False) -> dict:
    """exp(mean next-token NLL) of a causal LM over token-id documents.

    Each document is scored on its own (no context from other documents), cut into
    windows of `seq_len` tokens. Returns dict(perplexity, nll (nats/token), tokens
    (predicted tokens), windows); with `per_document`, also "per_document": one
    dict(nll_sum, nll_mean, tokens, windows) per document, in order (a document with
    fewer than two tokens predicts nothing: tokens 0, nll_mean None).
    Token ids outside the model's vocabulary are refused (EvalError), never scored.
    """
    cfg = model.cfg
    if not registry.of(cfg).causal_lm:
        raise EvalError(f"perplexity needs a causal LM; {cfg.name!r} is a {cfg.family} model")
    owners, chunks, n_docs = [], [], 0
    for d, doc in enumerate(documents):
        n_docs += 1
        doc = np.asarray(doc, np.int64)
        if doc.size and (doc.min() < 0 or doc.max() >= cfg.vocab_size):
            bad = int(doc.max() if doc.max() >= cfg.vocab_size else doc.min())
            raise EvalError(f"document {d}: token id {bad} is outside the model's vocabulary [0, {cfg.vocab_size}) "
                            "(a tokenizer larger than the model's?)")
        for w in windows(doc.tolist(), seq_len):
            chunks.append(w)
            owners.append(d)
    if not chunks:
        raise EvalError("no document has two or more tokens: nothing to predict")
    length = max(len(w) for w in chunks)
    doc_nll, doc_count, doc_windows = np.zeros(n_docs), np.zeros(n_docs), np.zeros(n_docs, np.int64)
    bar = _bar(len(chunks), "perplexity", progress)
    for a, b in _batches(len(chunks), batch_size):
        ids, seg = pad_rows(chunks[a:b], length, rows=batch_size)  # fixed shape: one compile
        s, w = _nll_rows(model, params, jnp.asarray(ids), jnp.asarray(seg))
        s, w = np.asarray(s, np.float64)[: b - a], np.asarray(w, np.float64)[: b - a]
        np.add.at(doc_nll, owners[a:b], s)
        np.add.at(doc_count, owners[a:b], w)
        np.add.at(doc_windows, owners[a:b], 1)
        bar.update(b - a)
    bar.close()
    nll, count = float(doc_nll.sum()), float(doc_count.sum())
    mean = nll / count
    out = {"perplexity": float(np.exp(mean)), "nll": mean, "tokens": int(count), "windows": len(chunks)}
    if per_document:
        out["per_document"] = [{"nll_sum": float(s), "nll_mean": float(s / c) if c else None, "tokens": int(c),
                                "windows": int(k)} for s, c, k in zip(doc_nll, doc_count, doc_windows)]
    return out


# --------------------------------------------------------------------- classification


@partial(jax.jit, static_argnums=0)
def _class_logits(model, params, ids_BT, seg_BT):
    return model.apply({"params": params}, ids_BT, segment_ids=seg_BT)


def class_logits(model, params, rows: Sequence[Sequence[int]], *, seq_len: int, batch_size: int,
                 put=None, progress: bool = True) -> np.ndarray:
    """Class logits [N, C] of a sequence classifier for framed token rows.

    `put(host_array)` places a batch on devices (the trainer's batch sharding when
    called from fine-tuning); default: the default device.
    """
    put = put or jnp.asarray
    out = []
    bar = _bar(len(rows), "classify", progress)
    for a, b in _batches(len(rows), batch_size):
        ids, seg = pad_rows(rows[a:b], seq_len, rows=batch_size)
        seg[b - a:, 0] = 1  # filler rows get one token, so every row is a real input
        out.append(np.asarray(jax.device_get(_class_logits(model, params, put(ids), put(seg))))[: b - a])
        bar.update(b - a)
    bar.close()
    return np.concatenate(out).astype(np.float64)


def generate_texts(model, params, tokenizer, inputs: Sequence[Sequence[int]], *, seq_len: int, batch_size: int,
                   max_new_tokens: int, progress: bool = True) -> list[str]:
    """Greedy outputs of an encoder-decoder (T5) for framed encoder inputs, decoded up to eos."""
    cfg = model.cfg
    texts = []
    bar = _bar(len(inputs), "generate", progress)
    for a, b in _batches(len(inputs), batch_size):
        rows = list(inputs[a:b]) + [[cfg.eos_token_id]] * (batch_size - (b - a))  # fixed batch: one compile
        ids, mask = pad_rows(rows, seq_len)
        new = np.asarray(generate(model, params, ids, mask, max_new_tokens=max_new_tokens))
        for row in new[: b - a]:
            row = list(row)
            if cfg.eos_token_id in row:
                row = row[: row.index(cfg.eos_token_id)]
            texts.append(decode_known(tokenizer, [t for t in row if t != cfg.pad_token_id]))
        bar.update(b - a)
    bar.close()
    return texts
