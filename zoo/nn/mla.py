"""Multi-head latent attention (DeepSeek-V2/V3, Kimi K2, Moonlight) through `kernels.attention`.

Per token x [D]:
  q      = RMSNorm(x W_qa) W_qb, per head [q_nope (Dn) | q_rope (Dr)]   (q_lora_rank None: x W_q)
  c_kv   = RMSNorm(x W_kva)  [R]; k_rope = x W_kr [Dr], one RoPE key shared by every head
  k_nope = c_kv W_uk [N, Dn];  v = c_kv W_uv [N, Dv]
  o      = softmax(scale * [q_nope | RoPE(q_rope)] . [k_nope | RoPE(k_rope)]) v,  then W_o
The q/k head dim is Dn + Dr and differs from v's Dv (kernels.attention takes that). The latent
norms use eps 1e-6 whatever the model's rms_norm_eps, as transformers does. RoPE rotates
half-split pairs; HF checkpoints' interleaved pairs are reordered at import
(zoo/hf/rules.py "linear_split_rope_pairs").

Params: q_a_proj [D, Rq], q_a_norm [Rq] (or none), q_nope_proj [Rq|D, N, Dn], q_rope_proj
[Rq|D, N, Dr], kv_a_proj [D, R], k_rope_proj [D, Dr], kv_a_norm [R], k_nope_proj [R, N, Dn],
v_proj [R, N, Dv], o_proj [N, Dv, D].

Decoding keeps the expanded keys and values in the KV cache (zoo/nn/attention.py
`write_kv_cache`); a cache of the latent alone, with the absorbed projections, is to come.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import linen as nn

import kernels
from zoo.nn.attention import write_kv_cache
from zoo.nn.linear import Dense
from zoo.nn.norms import RMSNorm
from zoo.nn.rope import apply_rope, rope_inv_freq
from zoo.sharding import constrain

LATENT_NORM_EPS = 1e-6


class MLAttention(nn.Module):
    """`__call__(x_BTD, positions_BT, segment_ids_BT) -> [B, T, D]` (causal)."""

    hidden_size: int
    num_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    scale: float
    rope_theta: float = 10000.0
    rope_scaling: tuple | None = None
    rope_factor: float = 1.0  # YaRN's factor on the rotated q and k (DeepSeek's mscale ratio)
    attention_impl: str | None = None
    decode: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BTD, positions_BT, segment_ids_BT):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        n, dn, dr, dv = self.num_heads, self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim
        b, t, _ = x_BTD.shape
        src, src_axes = x_BTD, ("embed",)
        if self.q_lora_rank:
            src = Dense((self.q_lora_rank,), ("embed",), ("q_lora",), name="q_a_proj", **kw)(x_BTD)
            src = RMSNorm(LATENT_NORM_EPS, axis_name="q_lora", name="q_a_norm", **kw)(src)
            src_axes = ("q_lora",)
        q_nope_BTNd = Dense((n, dn), src_axes, ("heads", "head_dim"), name="q_nope_proj", **kw)(src)
        q_rope_BTNr = Dense((n, dr), src_axes, ("heads", "head_dim"), name="q_rope_proj", **kw)(src)
        c_BTR = Dense((self.kv_lora_rank,), ("embed",), ("kv_lora",), name="kv_a_proj", **kw)(x_BTD)
        c_BTR = RMSNorm(LATENT_NORM_EPS, axis_name="kv_lora", name="kv_a_norm", **kw)(c_BTR)
        k_rope_BT1r = Dense((1, dr), ("embed",), (None, "head_dim"), name="k_rope_proj", **kw)(x_BTD)

        inv_freq = rope_inv_freq(dr, self.rope_theta, self.rope_scaling, positions_BT)
        factor = jnp.asarray(self.rope_factor, self.dtype)
        q_rope_BTNr = apply_rope(q_rope_BTNr, positions_BT, inv_freq) * factor
        k_rope_BT1r = apply_rope(k_rope_BT1r, positions_BT, inv_freq) * factor

        k_nope_BTNd = Dense((n, dn), ("kv_lora",), ("heads", "head_dim"), name="k_nope_proj", **kw)(c_BTR)
        v_BTNv = Dense((n, dv), ("kv_lora",), ("heads", "head_dim"), name="v_proj", **kw)(c_BTR)
        q_BTNH = jnp.concatenate([q_nope_BTNd, q_rope_BTNr], axis=-1)
        k_BTNH = jnp.concatenate([k_nope_BTNd, jnp.broadcast_to(k_rope_BT1r, (b, t, n, dr))], axis=-1)
        if self.decode:
            out_BTNv = self._attend_with_cache(q_BTNH, k_BTNH, v_BTNv, segment_ids_BT)
        else:
            out_BTNv = kernels.attention(q_BTNH, k_BTNH, v_BTNv, causal=True, segment_ids=segment_ids_BT,
                                         scale=self.scale, implementation=self.attention_impl)
        out_BTNv = constrain(out_BTNv, ("batch", "length", "activation_heads", None))
        return Dense((self.hidden_size,), ("heads", "head_dim"), ("embed",), name="o_proj", **kw)(out_BTNv)

    def _attend_with_cache(self, q_BTNH, k_BTNH, v_BTNv, segment_ids_BT):
        """The prefill (T > 1, from slot 0) attends within itself; one token over every written slot."""
        cached = write_kv_cache(self, k_BTNH, v_BTNv, segment_ids_BT)
        if cached is None:
            return jnp.zeros(q_BTNH.shape[:3] + (v_BTNv.shape[-1],), q_BTNH.dtype)
        keys, values, cached_ids_BS, ids_BT, i = cached
        if q_BTNH.shape[1] > 1:
            return kernels.attention(q_BTNH, k_BTNH, v_BTNv, causal=True, segment_ids=ids_BT, scale=self.scale,
                                     implementation=self.attention_impl)
        slot_S = jnp.arange(cached_ids_BS.shape[1])
        visible_BS = (cached_ids_BS > 0) & (slot_S <= i)[None]
        return kernels.attention(q_BTNH, keys, values, segment_ids=(ids_BT, visible_BS.astype(jnp.int32)),
                                 scale=self.scale, implementation=self.attention_impl)
