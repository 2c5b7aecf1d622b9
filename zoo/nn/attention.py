"""Multi-head / grouped-query self-attention through `kernels.attention`, with a KV cache for decoding."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

import kernels
from zoo.nn.linear import Dense
from zoo.nn.norms import RMSNorm
from zoo.nn.rope import apply_rope, rope_frequencies
from zoo.sharding import constrain


class SelfAttention(nn.Module):
    """Multi-head / grouped-query self-attention through `kernels.attention`.

    q_proj [D, N, H], k_proj/v_proj [D, K, H], o_proj [N, H, D]. Optional q/k bias
    (GPT-2, Qwen2), per-head q/k RMSNorm (Qwen3), RoPE, sliding window.
    """

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    qkv_bias: bool = False
    out_bias: bool = False
    qk_norm_eps: float | None = None
    rope_theta: float | None = None
    rope_scaling: tuple | None = None
    sliding_window: int | None = None
    causal: bool = True
    attention_impl: str | None = None
    decode: bool = False  # keep a KV cache in the "cache" collection (zoo/inference/decoder.py)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BTD, positions_BT, segment_ids_BT):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        n, k, h = self.num_heads, self.num_kv_heads, self.head_dim
        q_BTNH = Dense((n, h), ("embed",), ("heads", "head_dim"), use_bias=self.qkv_bias, name="q_proj", **kw)(x_BTD)
        k_BSKH = Dense((k, h), ("embed",), ("kv_heads", "head_dim"), use_bias=self.qkv_bias, name="k_proj", **kw)(x_BTD)
        v_BSKH = Dense((k, h), ("embed",), ("kv_heads", "head_dim"), use_bias=self.qkv_bias, name="v_proj", **kw)(x_BTD)
        if self.qk_norm_eps is not None:
            q_BTNH = RMSNorm(self.qk_norm_eps, axis_name="head_dim", name="q_norm", **kw)(q_BTNH)
            k_BSKH = RMSNorm(self.qk_norm_eps, axis_name="head_dim", name="k_norm", **kw)(k_BSKH)
        if self.rope_theta is not None:
            inv_freq = rope_frequencies(h, self.rope_theta, self.rope_scaling)
            q_BTNH = apply_rope(q_BTNH, positions_BT, inv_freq)
            k_BSKH = apply_rope(k_BSKH, positions_BT, inv_freq)
        if self.decode:
            out_BTNH = self._attend_with_cache(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT)
        else:
            out_BTNH = kernels.attention(
                q_BTNH, k_BSKH, v_BSKH, causal=self.causal, segment_ids=segment_ids_BT,
                sliding_window=self.sliding_window, implementation=self.attention_impl,
            )
        out_BTNH = constrain(out_BTNH, ("batch", "length", "activation_heads", None))
        return Dense((self.hidden_size,), ("heads", "head_dim"), ("embed",), use_bias=self.out_bias,
                     name="o_proj", **kw)(out_BTNH)

    def _attend_with_cache(self, q_BTNH, k_BTKH, v_BTKH, segment_ids_BT):
        """Writes this chunk's keys/values at the cache index, then attends.

        The cache is created at its full length by `init` on a [B, max_len] input.
        A chunk of T > 1 tokens is the prefill (written from index 0, attending within
        itself, so the fused kernel serves it); a single token attends over every
        written slot (within the sliding window, if any).
        """
        b, t, k, h = k_BTKH.shape
        names = ("batch", "kv_length", "kv_heads", "head_dim")
        is_init = not self.has_variable("cache", "key")
        cached_k = self.variable("cache", "key", jnp.zeros, (b, t, k, h), k_BTKH.dtype)
        cached_v = self.variable("cache", "value", jnp.zeros, (b, t, k, h), v_BTKH.dtype)
        cached_ids = self.variable("cache", "segment_ids", jnp.zeros, (b, t), jnp.int32)
        index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
        ids_BT = jnp.ones((b, t), jnp.int32) if segment_ids_BT is None else segment_ids_BT.astype(jnp.int32)
        if is_init:
            return jnp.zeros_like(q_BTNH)
        i = index.value
        cached_k.value = constrain(jax.lax.dynamic_update_slice(cached_k.value, k_BTKH, (0, i, 0, 0)), names)
        cached_v.value = constrain(jax.lax.dynamic_update_slice(cached_v.value, v_BTKH, (0, i, 0, 0)), names)
        cached_ids.value = jax.lax.dynamic_update_slice(cached_ids.value, ids_BT, (0, i))
        index.value = i + t
        if t > 1:
            return kernels.attention(q_BTNH, k_BTKH, v_BTKH, causal=True, segment_ids=ids_BT,
                                     sliding_window=self.sliding_window, implementation=self.attention_impl)
        s = cached_ids.value.shape[1]
        slot_S = jnp.arange(s)
        visible_BS = (cached_ids.value > 0) & (slot_S <= i)[None]
        if self.sliding_window is not None:
            visible_BS &= (slot_S > i - self.sliding_window)[None]
        return kernels.attention(q_BTNH, cached_k.value, cached_v.value, causal=False,
                                 segment_ids=(ids_BT, visible_BS.astype(jnp.int32)),
                                 implementation=self.attention_impl)
