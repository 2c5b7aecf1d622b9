"""KV-cache decoding for decoder-only models.

The model is cloned with `decode=True` (its attention layers keep a KV cache in the
"cache" collection, zoo/nn/attention.py). The prompt, left-padded, is prefilled in
one call (through the fused attention kernel), then the whole decode loop runs as one
compiled `lax.while_loop`: no Python per token.
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
