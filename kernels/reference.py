"""Pure-jnp attention: the specification of `kernels.attention` and its oracle.

Letter legend: B batch, T query length, S key/value length, N query heads,
K kv heads, G = N // K query heads per kv head, H head dim.

Order of operations on the logits (every implementation follows it):
  1. logits = scale * q.k                       (scale defaults to 1/sqrt(H))
  2. if logits_soft_cap=c: logits = c * tanh(logits / c)
  3. if bias is given:     logits = logits + bias
  4. masking (causal, sliding window, segment ids); softmax over the kept keys.
A query row that keeps no key gives an all-zero output row and zero gradients.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def split_segment_ids(segment_ids, batch: int, q_len: int, kv_len: int):
  """Returns (q_ids [B, T], kv_ids [B, S]) int32, or (None, None); validates shapes."""
  if segment_ids is None:
    return None, None
  if isinstance(segment_ids, (tuple, list)):
    if len(segment_ids) != 2:
      raise ValueError("segment_ids must be one [batch, len] array or a "
                       f"(q_ids, kv_ids) pair; got a sequence of {len(segment_ids)}")
    q_ids, kv_ids = segment_ids
  else:
    if q_len != kv_len:
      raise ValueError(
          f"a single segment_ids array needs q_len == kv_len (got {q_len} and "
          f"{kv_len}); pass a (q_segment_ids, kv_segment_ids) pair instead")
    q_ids = kv_ids = segment_ids
  if tuple(q_ids.shape) != (batch, q_len):
    raise ValueError(f"q segment ids must have shape {(batch, q_len)}, got {q_ids.shape}")
  if tuple(kv_ids.shape) != (batch, kv_len):
    raise ValueError(f"kv segment ids must have shape {(batch, kv_len)}, got {kv_ids.shape}")
  for ids in (q_ids, kv_ids):
    if not jnp.issubdtype(ids.dtype, jnp.integer):
      raise ValueError(f"segment ids must be integers, got {ids.dtype}")
  return q_ids.astype(jnp.int32), kv_ids.astype(jnp.int32)


def attention_mask(q_len: int, kv_len: int, *, causal=False, sliding_window=None,
                   q_ids=None, kv_ids=None):
  """Boolean keep-mask, broadcastable to [B, T, S]; None when nothing is masked."""
  mask_BTS = None
  if causal or sliding_window is not None:
    # Queries are the last q_len of kv_len positions (decoding with a cache).
    q_pos_T = jnp.arange(q_len)[:, None] + (kv_len - q_len)
    k_pos_S = jnp.arange(kv_len)[None, :]
    keep_TS = jnp.ones((q_len, kv_len), bool)
    if causal:
      keep_TS &= k_pos_S <= q_pos_T
    if sliding_window is not None:
      keep_TS &= (k_pos_S > q_pos_T - sliding_window) & (k_pos_S <= q_pos_T)
    mask_BTS = keep_TS[None]
  if q_ids is not None:
    same_BTS = (q_ids[:, :, None] == kv_ids[:, None, :]) & (q_ids[:, :, None] != 0)
    mask_BTS = same_BTS if mask_BTS is None else mask_BTS & same_BTS
  return mask_BTS


def reference_attention(q, k, v, *, causal=False, segment_ids=None, scale=None,
                        sliding_window=None, logits_soft_cap=None, bias=None):
  """Multi-head attention in float32, written for clarity; output in q's dtype.

  Args:
    q: [B, T, N, H]; k, v: [B, S, K, H] with K dividing N (GQA/MQA: query head
      n uses kv head n // (N // K); K/V are not repeated).
    causal: mask future keys; with T != S the last query aligns with the last key.
    segment_ids: int32 [B, T] (T == S) or a (q_ids [B, T], kv_ids [B, S]) pair;
      tokens attend within their id; id 0 is padding and attends nowhere.
    scale: logit scale, default 1/sqrt(H).
    sliding_window: W; query at position i sees keys j with i - W < j <= i.
    logits_soft_cap: c; scaled logits x become c * tanh(x / c) (before bias).
    bias: additive float logits bias broadcastable to [B, N, T, S].

  Returns:
    [B, T, N, H] in q's dtype; rows with no key to attend to are zeros.
  """
  B, T, N, H = q.shape
  _, S, K, _ = k.shape
  G = N // K
  if scale is None:
    scale = 1.0 / math.sqrt(H)
  q_ids, kv_ids = split_segment_ids(segment_ids, B, T, S)

  q_BTKGH = q.astype(jnp.float32).reshape(B, T, K, G, H)
  logits_BKGTS = scale * jnp.einsum("BTKGH,BSKH->BKGTS", q_BTKGH,
                                    k.astype(jnp.float32))
  if logits_soft_cap is not None:
    logits_BKGTS = logits_soft_cap * jnp.tanh(logits_BKGTS / logits_soft_cap)
  if bias is not None:
    bias_BNTS = jnp.broadcast_to(bias.astype(jnp.float32), (B, N, T, S))
    logits_BKGTS = logits_BKGTS + bias_BNTS.reshape(B, K, G, T, S)

  mask_BTS = attention_mask(T, S, causal=causal, sliding_window=sliding_window,
                            q_ids=q_ids, kv_ids=kv_ids)
  if mask_BTS is not None:
    keep_BKGTS = mask_BTS[:, None, None]
    # A finite fill keeps gradients finite; masked probabilities are zeroed below.
    logits_BKGTS = jnp.where(keep_BKGTS, logits_BKGTS, -1e30)
  # Softmax is shift-invariant, so the max needs no gradient.
  max_BKGT = jax.lax.stop_gradient(jnp.max(logits_BKGTS, axis=-1, keepdims=True))
  probs_BKGTS = jnp.exp(logits_BKGTS - max_BKGT)
  if mask_BTS is not None:
    probs_BKGTS = jnp.where(keep_BKGTS, probs_BKGTS, 0.0)
  denom_BKGT = jnp.sum(probs_BKGTS, axis=-1, keepdims=True)
  probs_BKGTS = probs_BKGTS / jnp.where(denom_BKGT == 0.0, 1.0, denom_BKGT)
  out_BTKGH = jnp.einsum("BKGTS,BSKH->BTKGH", probs_BKGTS, v.astype(jnp.float32))
  return out_BTKGH.reshape(B, T, N, H).astype(q.dtype)
