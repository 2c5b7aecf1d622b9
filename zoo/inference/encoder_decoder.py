"""Decoding for encoder-decoder models (T5).

The model's contract (zoo/models/t5/model.py): `apply(..., encode_only=True)` returns
the encoder output, `apply(..., decoder_input_ids=, encoder_outputs=)` reuses it, and
the decoder starts from `cfg.decoder_start_token_id`. The input feeds the encoder once;
each step reruns the decoder over a fixed-length buffer (no KV cache yet, fine for
short outputs), all inside one compiled `lax.while_loop`.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from zoo.inference.sampling import sample_logits


@partial(jax.jit, static_argnames=("model", "max_new_tokens", "temperature", "top_k", "top_p", "vocab_limit"))
def decode(model, params, input_ids, attention_mask, stop_ids, pad_id, rng, *, max_new_tokens, temperature,
           top_k, top_p, vocab_limit):
    """New decoder tokens [B, max_new_tokens]; a row holds pad_id after a stop id."""
    variables = {"params": params}
    b = input_ids.shape[0]
    enc_BSD = model.apply(variables, input_ids, attention_mask, encode_only=True)
    # A fixed-length decoder buffer keeps shapes static (one compile); causal attention
    # makes the not-yet-written slots invisible to position i.
    dec_BN = jnp.full((b, max_new_tokens + 1), pad_id, jnp.int32).at[:, 0].set(model.cfg.decoder_start_token_id)
    out_BN = jnp.full((b, max_new_tokens), pad_id, jnp.int32)

    def cond(carry):
        i, _, _, done, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, dec_BN, out_BN, done, rng = carry
        logits_BNV = model.apply(variables, input_ids, attention_mask, decoder_input_ids=dec_BN[:, :-1],
                                 encoder_outputs=enc_BSD)
        rng, sub = jax.random.split(rng)
        logits_BV = jax.lax.dynamic_index_in_dim(logits_BNV, i, axis=1, keepdims=False)
        tok_B = sample_logits(logits_BV, sub, temperature=temperature, top_k=top_k, top_p=top_p,
                              vocab_limit=vocab_limit)
        tok_B = jnp.where(done, pad_id, tok_B)
        out_BN = jax.lax.dynamic_update_slice(out_BN, tok_B[:, None], (0, i))
        dec_BN = jax.lax.dynamic_update_slice(dec_BN, tok_B[:, None], (0, i + 1))
        return i + 1, dec_BN, out_BN, done | jnp.isin(tok_B, stop_ids), rng

    carry = (jnp.int32(0), dec_BN, out_BN, jnp.zeros((b,), bool), rng)
    return jax.lax.while_loop(cond, body, carry)[2]
