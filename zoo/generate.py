"""KV-cache decoding and sampling for the decoder families.

`generate` left-aligns nothing: it expects prompts left-padded (HF's convention for
decoder-only generation; right-padded prompts are re-padded to the left here). The
prompt is prefilled in one call (through the fused attention kernel), then the whole
decode loop runs as one compiled `lax.while_loop`: no Python per token.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

NEG_INF = -1e30


def _left_pad(input_ids: np.ndarray, mask: np.ndarray, pad_id: int):
    """Moves each row's real tokens to the right end (left padding)."""
    out_ids = np.full_like(input_ids, pad_id)
    out_mask = np.zeros_like(mask)
    for r in range(input_ids.shape[0]):
        toks = input_ids[r][mask[r] > 0]
        if len(toks):
            out_ids[r, -len(toks):] = toks
            out_mask[r, -len(toks):] = 1
    return out_ids, out_mask


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


@partial(jax.jit, static_argnames=("model", "max_new_tokens", "temperature", "top_k", "top_p", "vocab_limit"))
def _decode(model, params, input_ids, attention_mask, stop_ids, pad_id, rng, *, max_new_tokens, temperature,
            top_k, top_p, vocab_limit):
    b, t = input_ids.shape
    dmodel = model.clone(decode=True)
    # Create the cache at full length (attention is skipped while it is being created).
    total = t + max_new_tokens
    _, vars_ = dmodel.apply({"params": params}, jnp.zeros((b, total), jnp.int32), mutable=["cache"])
    cache = vars_["cache"]
    positions = jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0).astype(jnp.int32)
    logits, vars_ = dmodel.apply({"params": params, "cache": cache}, input_ids, attention_mask,
                                 positions=positions, mutable=["cache"])
    rng, sub = jax.random.split(rng)
    tok = sample_logits(logits[:, -1], sub, temperature=temperature, top_k=top_k, top_p=top_p,
                        vocab_limit=vocab_limit)
    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(tok)
    done = jnp.isin(tok, stop_ids)
    pos = positions[:, -1] + 1

    def cond(carry):
        i, _, _, _, _, done, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, cache, tok, pos, out, done, rng = carry
        logits, vars_ = dmodel.apply({"params": params, "cache": cache}, tok[:, None], jnp.ones((b, 1), jnp.int32),
                                     positions=pos[:, None], mutable=["cache"])
        rng, sub = jax.random.split(rng)
        new = sample_logits(logits[:, -1], sub, temperature=temperature, top_k=top_k, top_p=top_p,
                            vocab_limit=vocab_limit)
        new = jnp.where(done, pad_id, new)
        out = jax.lax.dynamic_update_slice(out, new[:, None], (0, i))
        done = done | jnp.isin(new, stop_ids)
        return i + 1, vars_["cache"], new, pos + 1, out, done, rng

    carry = (jnp.int32(1), vars_["cache"], tok, pos, out, done, rng)
    return jax.lax.while_loop(cond, body, carry)[4]


def generate(model, params, input_ids, attention_mask=None, *, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0, stop_tokens=(),
             num_return_sequences: int = 1, pad_id: int = 0, vocab_limit: int | None = None):
    """New token ids [batch * num_return_sequences, max_new_tokens].

    temperature 0 is greedy. After a row emits one of `stop_tokens` its remaining
    positions hold `pad_id`. Prompts of different lengths come with an
    attention_mask (1 real, 0 padding), padded on either side. `vocab_limit` (the
    tokenizer's size) keeps ids the tokenizer cannot decode from being sampled; a
    top_k above it is clamped to it (as transformers clamps to the vocabulary).
    """
    if getattr(model, "cfg", None) is not None and getattr(model.cfg, "family", "") == "t5":
        from zoo.models.t5.model import generate as t5_generate  # encoder-decoder path

        return t5_generate(model, params, input_ids, attention_mask, max_new_tokens=max_new_tokens,
                           temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, stop_tokens=stop_tokens,
                           num_return_sequences=num_return_sequences, pad_id=pad_id, vocab_limit=vocab_limit)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    vocab_limit, top_k = clamp_vocab(model.cfg.vocab_size, vocab_limit, top_k)
    ids = np.asarray(input_ids, dtype=np.int32)
    if ids.ndim == 1:
        ids = ids[None]
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int32).reshape(ids.shape)
    vocab = model.cfg.vocab_size
    if ids[mask > 0].size and (ids[mask > 0].min() < 0 or ids[mask > 0].max() >= vocab):
        bad = int(ids[mask > 0].max() if ids[mask > 0].max() >= vocab else ids[mask > 0].min())
        raise ValueError(f"prompt token id {bad} is outside the model's vocabulary [0, {vocab})")
    if (mask.sum(axis=1) == 0).any():
        raise ValueError("every prompt needs at least one real token (attention_mask row of zeros)")
    max_len = getattr(model.cfg, "max_seq_len", None)
    if max_len is not None and getattr(model.cfg, "family", "") == "gpt2" and ids.shape[1] + max_new_tokens > max_len:
        raise ValueError(f"prompt length {ids.shape[1]} + max_new_tokens {max_new_tokens} exceeds the model's "
                         f"{max_len} learned positions")
    ids, mask = _left_pad(ids, mask, pad_id)
    if num_return_sequences > 1:
        ids, mask = np.repeat(ids, num_return_sequences, axis=0), np.repeat(mask, num_return_sequences, axis=0)
    stop = jnp.asarray(list(stop_tokens) or [-1], jnp.int32)
    return _decode(model, params, jnp.asarray(ids), jnp.asarray(mask), stop, jnp.int32(pad_id),
                   jax.random.key(seed), max_new_tokens=max_new_tokens, temperature=float(temperature),
                   top_k=top_k, top_p=top_p, vocab_limit=vocab_limit)
