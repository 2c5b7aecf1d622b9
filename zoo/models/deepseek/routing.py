"""DeepSeekMoE routing and the auxiliary-loss-free load balancing of DeepSeek-V3.

Three top-k methods (HF config `topk_method`), every one in float32:
  * "greedy" (DeepSeek-V2): softmax over the experts, the k largest;
  * "group_limited_greedy" (DeepSeek-V2): the experts form `n_group` groups, each scored by
    its largest probability; only the `topk_group` best groups compete for the k;
  * "noaux_tc" (DeepSeek-V3, Kimi K2, Moonlight): sigmoid scores; a per-expert correction
    bias is added for the choice only (never to the weights); a group scores the sum of its
    two largest biased scores.
The kept experts' (unbiased) scores are the weights, renormalised to sum to 1 when
`normalize`, then multiplied by `scale` (HF's routed_scaling_factor).

The bias is trained by no gradient: after each step, `bias_update` moves it toward balanced
load (DeepSeek-V3, section 2.1.2): b_e += rate * sign(mean load - load_e).

Letters: N tokens, E experts, G groups, k experts per token, L layers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

METHODS = ("greedy", "group_limited_greedy", "noaux_tc")


def route_grouped(logits_NE, bias_E=None, *, k: int, method: str, n_group: int = 1, topk_group: int = 1,
                  normalize: bool, scale: float = 1.0):
    """DeepSeekMoE top-k routing. Returns (weights [N, k] float32, experts [N, k] int32,
    probabilities [N, E] float32); the probabilities (softmax, or the sigmoid scores divided by
    their sum) feed only the load-balancing statistics."""
    if method not in METHODS:
        raise ValueError(f"topk_method must be one of {METHODS}, got {method!r}")
    logits_NE = logits_NE.astype(jnp.float32)
    n, e = logits_NE.shape
    if method == "noaux_tc":
        scores_NE = jax.nn.sigmoid(logits_NE)
        choice_NE = scores_NE if bias_E is None else scores_NE + bias_E.astype(jnp.float32)[None]
        probs_NE = scores_NE / jnp.sum(scores_NE, axis=-1, keepdims=True)
    else:
        scores_NE = probs_NE = choice_NE = jax.nn.softmax(logits_NE, axis=-1)
    if method != "greedy":
        grouped_NGe = choice_NE.reshape(n, n_group, e // n_group)
        if method == "noaux_tc":
            group_NG = jnp.sum(jax.lax.top_k(grouped_NGe, 2)[0], axis=-1)
        else:
            group_NG = jnp.max(grouped_NGe, axis=-1)
        _, kept_Ng = jax.lax.top_k(group_NG, topk_group)
        keep_NG = jnp.sum(jax.nn.one_hot(kept_Ng, n_group, dtype=jnp.int32), axis=1) > 0
        choice_NE = jnp.where(jnp.repeat(keep_NG, e // n_group, axis=-1), choice_NE, -jnp.inf)
    _, experts_Nk = jax.lax.top_k(choice_NE, k)
    weights_Nk = jnp.take_along_axis(scores_NE, experts_Nk, axis=-1)
    if normalize:
        weights_Nk = weights_Nk / (jnp.sum(weights_Nk, axis=-1, keepdims=True) + 1e-20)
    return weights_Nk * scale, experts_Nk.astype(jnp.int32), probs_NE


def bias_update(bias_LE, counts_LE, rate: float):
    """One step of auxiliary-loss-free balancing: each layer's overloaded experts (more
    assignments than the layer's mean) lose `rate`, underloaded ones gain it, exact ties stay."""
    counts_LE = counts_LE.astype(jnp.float32)
    mean_L1 = jnp.mean(counts_LE, axis=-1, keepdims=True)
    return bias_LE + jnp.asarray(rate, bias_LE.dtype) * jnp.sign(mean_L1 - counts_LE).astype(bias_LE.dtype)
