"""Picking the next token from logits: greedy, temperature, top-k and top-p (nucleus) sampling."""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30


def sample_logits(logits_BV, rng, *, temperature: float, top_k: int | None, top_p: float | None,
                  vocab_limit: int | None = None):
    """One token per row. temperature 0 is greedy; top_k / top_p filter before sampling.

    Ids >= vocab_limit are never picked: a model's vocabulary is often padded past its
    tokenizer's (to a multiple of 128), and those rows decode to nothing.
    """
    if vocab_limit is not None and vocab_limit < logits_BV.shape[-1]:
        logits_BV = jnp.where(jnp.arange(logits_BV.shape[-1]) < vocab_limit, logits_BV, NEG_INF)
    if temperature == 0.0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV.astype(jnp.float32) / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth, NEG_INF, logits_BV)
    if top_p is not None:
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_BV, axis=-1)
        # keep the smallest prefix whose mass reaches top_p (the top token always stays)
        exclusive_cum = jnp.cumsum(probs, axis=-1) - probs
        cutoff_idx = jnp.sum(exclusive_cum < top_p, axis=-1, keepdims=True) - 1
        cutoff = jnp.take_along_axis(sorted_BV, cutoff_idx, axis=-1)
        logits_BV = jnp.where(logits_BV < cutoff, NEG_INF, logits_BV)
    return jax.random.categorical(rng, logits_BV, axis=-1).astype(jnp.int32)


def clamp_vocab(vocab_size: int, vocab_limit: int | None, top_k: int | None) -> tuple[int | None, int | None]:
    """(vocab_limit, top_k) as the decoder uses them: a limit only where it cuts the model's
    vocabulary, and top_k at most the number of ids that can be sampled."""
    if vocab_limit is not None and vocab_limit < 1:
        raise ValueError(f"vocab_limit must be >= 1, got {vocab_limit}")
    limit = vocab_limit if vocab_limit is not None and vocab_limit < vocab_size else None
    if top_k is not None:
        top_k = min(top_k, limit or vocab_size)
    return limit, top_k
