"""Pure-jnp attention: the specification of `kernels.attention` and its oracle.

Letter legend: B batch, T query length, S key/value length, N query heads,
K kv heads, G = N // K query heads per kv head, H head dim.

Order of operations on the logits (every implementation follows it):
  1. logits = scale * q.k                       (scale defaults to 1/sqrt(H))
  2. if logits_soft_cap=c: logits = c * tanh(logits / c)
  3. if bias is given:     logits = logits + bias
  4. masking (causal, sliding window, segment ids); softmax over the kept keys,
     and with `sinks` over [kept logits, sink of the query head] (the sink has no
     value: it only takes probability mass; GPT-OSS).
A query row that keeps no key gives an all-zero output row and zero gradients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels import base


def reference_attention(q, k, v, *, causal=False, segment_ids=None, scale=None,
                        sliding_window=None, logits_soft_cap=None, bias=None, sinks=None):
    """Multi-head attention in float32, written for clarity; output in q's dtype.

    Args:
      q: [B, T, N, H]; k: [B, S, K, H]; v: [B, S, K, Hv] with K dividing N (GQA/MQA: query head
        n uses kv head n // (N // K); K/V are not repeated).
      causal: mask future keys; with T != S the last query aligns with the last key.
      segment_ids: int32 [B, T] (T == S) or a (q_ids [B, T], kv_ids [B, S]) pair;
        tokens attend within their id; id 0 is padding and attends nowhere.
      scale: logit scale, default 1/sqrt(H).
      sliding_window: W; query at position i sees keys j with i - W < j <= i.
      logits_soft_cap: c; scaled logits x become c * tanh(x / c) (before bias).
      bias: additive float logits bias broadcastable to [B, N, T, S].
      sinks: float [N], one logit per query head added to every row's softmax (unscaled).

    Returns:
      [B, T, N, Hv] in q's dtype; rows with no key to attend to are zeros.
    """
    q_ids, kv_ids, options = base.validate(
        q, k, v, causal=causal, segment_ids=segment_ids, scale=scale,
        sliding_window=sliding_window, logits_soft_cap=logits_soft_cap, bias=bias)
    return attend(q, k, v, q_ids, kv_ids, options, bias, base.validate_sinks(sinks, q.shape[2]))


def attend(q, k, v, q_ids, kv_ids, options: base.Options, bias=None, sinks=None):
    """`reference_attention` on inputs that `base.validate` has checked and normalised."""
    return _softmax_attend(q, k, v, q_ids, kv_ids, options, bias, sinks)[0]


def attend_with_lse(q, k, v, q_ids, kv_ids, options: base.Options):
    """`attend` (no bias, no sinks) and the natural log-sum-exp of each row's kept, scaled
    (soft-capped) logits: (out [B, T, N, Hv] in q's dtype, lse [B, T, N] float32).

    A row with no key to attend to gives out 0 and lse `base.MASK_VALUE`, with zero gradients.
    Two calls on disjoint key blocks merge exactly by their lse (as ring attention does).
    """
    out_BTNH, max_BKGT, denom_BKGT = _softmax_attend(q, k, v, q_ids, kv_ids, options)
    empty_BKGT = denom_BKGT == 0.0
    lse_BKGT = jnp.where(empty_BKGT, base.MASK_VALUE,
                         max_BKGT + jnp.log(jnp.where(empty_BKGT, 1.0, denom_BKGT)))
    B, K, G, T, _ = lse_BKGT.shape
    lse_BTN = jnp.transpose(lse_BKGT[..., 0], (0, 3, 1, 2)).reshape(B, T, K * G)
    return out_BTNH, lse_BTN


def _masked_logits(q, k, q_ids, kv_ids, options: base.Options, bias=None):
    """(logits [B, K, G, T, S] float32, keep-mask broadcastable to them or None): scaled,
    soft-capped, biased logits with masked entries set to `base.MASK_VALUE`."""
    B, T, N, H = q.shape
    _, S, K, _ = k.shape
    G = N // K

    q_BTKGH = q.astype(jnp.float32).reshape(B, T, K, G, H)
    logits_BKGTS = options.scale * jnp.einsum("BTKGH,BSKH->BKGTS", q_BTKGH,
                                              k.astype(jnp.float32))
    if options.logits_soft_cap is not None:
        cap = options.logits_soft_cap
        logits_BKGTS = cap * jnp.tanh(logits_BKGTS / cap)
    if bias is not None:
        bias_BNTS = jnp.broadcast_to(bias.astype(jnp.float32), (B, N, T, S))
        logits_BKGTS = logits_BKGTS + bias_BNTS.reshape(B, K, G, T, S)

    q_pos_1T1 = key_pos_11S = None
    if options.causal or options.sliding_window is not None:
        # Queries are the last T of S positions (decoding with a cache).
        q_pos_1T1 = (jnp.arange(T) + (S - T))[None, :, None]
        key_pos_11S = jnp.arange(S)[None, None, :]
    ids = (None, None) if q_ids is None else (q_ids[:, :, None], kv_ids[:, None, :])
    mask_BTS = options.keep_mask(q_pos_1T1, key_pos_11S, *ids)
    if mask_BTS is None:
        return logits_BKGTS, None
    keep_B11TS = mask_BTS[:, None, None]
    # A finite fill keeps gradients finite; masked probabilities are zeroed after the exp.
    return jnp.where(keep_B11TS, logits_BKGTS, base.MASK_VALUE), keep_B11TS


def _softmax_attend(q, k, v, q_ids, kv_ids, options: base.Options, bias=None, sinks=None):
    """(out [B, T, N, Hv] in q's dtype, the row max [B, K, G, T, 1] (no gradient) and the
    softmax denominator over the kept keys [B, K, G, T, 1], without the sink's term)."""
    B, T, N, _ = q.shape
    K = k.shape[2]
    G = N // K
    logits_BKGTS, keep_B11TS = _masked_logits(q, k, q_ids, kv_ids, options, bias)
    # Softmax is shift-invariant, so the max needs no gradient.
    max_BKGT = jnp.max(logits_BKGTS, axis=-1, keepdims=True)
    if sinks is not None:
        sink_1KG11 = sinks.astype(jnp.float32).reshape(1, K, G, 1, 1)
        max_BKGT = jnp.maximum(max_BKGT, sink_1KG11)
    max_BKGT = jax.lax.stop_gradient(max_BKGT)
    probs_BKGTS = jnp.exp(logits_BKGTS - max_BKGT)
    if keep_B11TS is not None:
        probs_BKGTS = jnp.where(keep_B11TS, probs_BKGTS, 0.0)
    kept_BKGT = jnp.sum(probs_BKGTS, axis=-1, keepdims=True)
    denom_BKGT = kept_BKGT
    if sinks is not None:
        denom_BKGT = denom_BKGT + jnp.exp(sink_1KG11 - max_BKGT)
    probs_BKGTS = probs_BKGTS / jnp.where(denom_BKGT == 0.0, 1.0, denom_BKGT)
    out_BTKGH = jnp.einsum("BKGTS,BSKH->BTKGH", probs_BKGTS, v.astype(jnp.float32))
    return out_BTKGH.reshape(B, T, N, v.shape[3]).astype(q.dtype), max_BKGT, kept_BKGT
