"""`generate` (zoo.generate): checks the request, then runs the decode loop of the model's kind.

Decoders (zoo/inference/decoder.py) take prompts left-padded (HF's convention for
decoder-only generation; right-padded prompts are re-padded to the left here);
encoder-decoders (zoo/inference/encoder_decoder.py) feed the input to the encoder.
Which loop, and whether positions are bounded, comes from the family record (zoo.registry).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from zoo import registry
from zoo.inference import decoder, encoder_decoder
from zoo.inference.sampling import clamp_vocab


def _check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def _prompts(vocab: int, input_ids, attention_mask) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask) as int32 [B, T] host arrays; every row holds a real token, all inside the vocabulary."""
    ids = np.asarray(input_ids, dtype=np.int32)
    if ids.ndim == 1:
        ids = ids[None]
    mask = (np.ones_like(ids) if attention_mask is None
            else np.asarray(attention_mask, dtype=np.int32).reshape(ids.shape))
    real = ids[mask > 0]
    if real.size and (real.min() < 0 or real.max() >= vocab):
        bad = int(real.max() if real.max() >= vocab else real.min())
        raise ValueError(f"prompt token id {bad} is outside the model's vocabulary [0, {vocab})")
    if (mask.sum(axis=1) == 0).any():
        raise ValueError("every prompt needs at least one real token (attention_mask row of zeros)")
    return ids, mask


def generate(model, params, input_ids, attention_mask=None, *, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0, stop_tokens=(),
             num_return_sequences: int = 1, pad_id: int | None = None, vocab_limit: int | None = None):
    """New token ids [batch * num_return_sequences, max_new_tokens].

    temperature 0 is greedy. After a row emits one of `stop_tokens` its remaining
    positions hold `pad_id`. Prompts of different lengths come with an
    attention_mask (1 real, 0 padding), padded on either side. `vocab_limit` (the
    tokenizer's size) keeps ids the tokenizer cannot decode from being sampled; a
    top_k above it is clamped to it (as transformers clamps to the vocabulary).

    Decoders: pad_id defaults to 0 and nothing stops a row unless `stop_tokens` says so.
    Encoder-decoders (T5): input_ids feed the encoder once and the decoder starts from
    decoder_start_token_id; pad_id defaults to the config's pad and, as HF, rows stop at
    the config's eos when `stop_tokens` is empty.
    """
    family, cfg = registry.of(model), model.cfg
    if not family.generates:
        raise ValueError(f"{cfg.name}: {family.name} is an {family.kind} model; it does not generate text")
    _check_sampling(max_new_tokens, temperature, top_k, top_p)
    vocab_limit, top_k = clamp_vocab(cfg.vocab_size, vocab_limit, top_k)
    ids, mask = _prompts(cfg.vocab_size, input_ids, attention_mask)
    if family.learned_positions and ids.shape[1] + max_new_tokens > cfg.max_seq_len:
        raise ValueError(f"prompt length {ids.shape[1]} + max_new_tokens {max_new_tokens} exceeds the model's "
                         f"{cfg.max_seq_len} learned positions")
    if family.kind == "encoder-decoder":
        pad = cfg.pad_token_id if pad_id is None else pad_id
        stop, loop = list(stop_tokens) or [cfg.eos_token_id], encoder_decoder.decode
    else:
        pad = 0 if pad_id is None else pad_id
        ids, mask = decoder.left_pad(ids, mask, pad)
        stop, loop = list(stop_tokens) or [-1], decoder.decode
    if num_return_sequences > 1:
        ids, mask = np.repeat(ids, num_return_sequences, axis=0), np.repeat(mask, num_return_sequences, axis=0)
    return loop(model, params, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(stop, jnp.int32), jnp.int32(pad),
                jax.random.key(seed), max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=top_k,
                top_p=top_p, vocab_limit=vocab_limit)
