"""KV-cache decoding for decoder-only models.

The model is cloned with `decode=True` (its attention layers keep a KV cache in the
"cache" collection, zoo/nn/attention.py). The prompt, left-padded, is prefilled in
one call (through the fused attention kernel), then the whole decode loop runs as one
compiled `lax.while_loop`: no Python per token.

LongRoPE models (Phi-3 128k, Phi-3.5, Phi-4-mini) rotate with their short factors until a
sequence passes original_max_position tokens and with the long ones after; cached keys
rotated with the short ones would then be wrong, so (as transformers does) the step that
first passes it re-prefills the whole sequence so far into a fresh cache, and decoding
goes on from there: two loops around one prefill, all in the one compiled function.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from zoo.inference.sampling import sample_logits


def left_pad(input_ids: np.ndarray, mask: np.ndarray, pad_id: int):
    """Moves each row's real tokens to the right end (left padding)."""
    out_ids = np.full_like(input_ids, pad_id)
    out_mask = np.zeros_like(mask)
    for r in range(input_ids.shape[0]):
        toks = input_ids[r][mask[r] > 0]
        if len(toks):
            out_ids[r, -len(toks):] = toks
            out_mask[r, -len(toks):] = 1
    return out_ids, out_mask


@partial(jax.jit, static_argnames=("model", "max_new_tokens", "temperature", "top_k", "top_p", "vocab_limit"))
def decode(model, params, input_ids, attention_mask, stop_ids, pad_id, rng, *, max_new_tokens, temperature,
           top_k, top_p, vocab_limit):
    """New tokens [B, max_new_tokens] after left-padded prompts; a row holds pad_id after a stop id."""
    b, t = input_ids.shape
    dmodel = model.clone(decode=True)
    # Create the cache at full length (attention is skipped while it is being created).
    total = t + max_new_tokens
    _, vars_ = dmodel.apply({"params": params}, jnp.zeros((b, total), jnp.int32), mutable=["cache"])
    empty_cache = vars_["cache"]

    def prefill(ids, mask, rng):
        positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0).astype(jnp.int32)
        logits, vars_ = dmodel.apply({"params": params, "cache": empty_cache}, ids, mask, positions=positions,
                                     mutable=["cache"])
        rng, sub = jax.random.split(rng)
        tok = sample_logits(logits[:, -1], sub, temperature=temperature, top_k=top_k, top_p=top_p,
                            vocab_limit=vocab_limit)
        return vars_["cache"], tok, positions[:, -1] + 1, rng

    cache, tok, pos, rng = prefill(input_ids, attention_mask, rng)
    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(tok)
    done = jnp.isin(tok, stop_ids)
    restart = _longrope_restart(model.cfg, t, max_new_tokens)

    def cond_until(stop):
        def cond(carry):
            i, _, _, _, _, done, _ = carry
            return (i < stop) & ~jnp.all(done)
        return cond

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

    carry = (jnp.int32(1), cache, tok, pos, out, done, rng)
    if restart is None:
        return jax.lax.while_loop(cond_until(max_new_tokens), body, carry)[4]
    # LongRoPE: tokens 1..restart-1 with the short factors, then the sequence so far again
    _, _, _, _, out, done, rng = jax.lax.while_loop(cond_until(restart), body, carry)
    ids = jnp.concatenate([input_ids.astype(jnp.int32), out[:, :restart]], axis=1)
    mask = jnp.concatenate([attention_mask.astype(jnp.int32), jnp.ones((b, restart), jnp.int32)], axis=1)
    cache, tok, pos, rng = prefill(ids, mask, rng)
    tok = jnp.where(done, pad_id, tok)
    out = out.at[:, restart].set(tok)
    done = done | jnp.isin(tok, stop_ids)
    carry = (jnp.int32(restart + 1), cache, tok, pos, out, done, rng)
    return jax.lax.while_loop(cond_until(max_new_tokens), body, carry)[4]


def _longrope_restart(cfg, prompt_len: int, max_new_tokens: int) -> int | None:
    """The index of the new token whose step first sees more than original_max_position tokens
    (prompt width included, as transformers counts), when that happens inside this generation."""
    scaling = getattr(cfg, "rope_scaling", None)
    if not scaling or scaling[0] != "longrope":
        return None
    step = scaling[3] + 1 - prompt_len
    return step if 1 <= step < max_new_tokens else None
