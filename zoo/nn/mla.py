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

Decoding (`decode=True`) caches per token and layer only [c_kv | RoPE(k_rope)], R + Dr values
(`kv_cache="latent"`, the default; DeepSeek-V3 in bfloat16: 576 x 61 x 2 = 70,272 bytes a token
where full keys and values take 4,997,120). A prompt chunk attends in the expanded form above;
each later token in the absorbed form, with W_uk folded into the query and W_uv applied to the
attended latent:
  logit(n, s) = scale * [q_nope_n W_uk,n^T | q_rope_n] . [c_s | k_rope_s]   (one shared kv head)
  o_n         = (softmax . c) W_uv,n
`kv_cache="full"` keeps the expanded keys and values instead (zoo/nn/attention.py
`write_kv_cache`), the reference the latent cache is tested against.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import linen as nn

import kernels
from zoo.nn.attention import write_cache, write_kv_cache
from zoo.nn.linear import Dense
from zoo.nn.norms import RMSNorm
from zoo.nn.rope import apply_rope, rope_inv_freq
from zoo.sharding import constrain

LATENT_NORM_EPS = 1e-6
KV_CACHES = ("latent", "full")


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
    context_parallel: str | None = None  # kernels.attention's, in training only (zoo/nn/attention.py)
    decode: bool = False
    kv_cache: str = "latent"  # KV_CACHES: what decoding keeps per token
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

        k_nope_proj = Dense((n, dn), ("kv_lora",), ("heads", "head_dim"), name="k_nope_proj", **kw)
        v_proj = Dense((n, dv), ("kv_lora",), ("heads", "head_dim"), name="v_proj", **kw)
        o_proj = Dense((self.hidden_size,), ("heads", "head_dim"), ("embed",), name="o_proj", **kw)
        if self.decode and self.kv_cache == "latent":
            latent_BTL = jnp.concatenate([c_BTR, k_rope_BT1r[:, :, 0]], axis=-1)
            written = write_cache(self, {"latent": (latent_BTL, ("batch", "kv_length", None))}, segment_ids_BT)
            if written is None:  # the cache is being created at full length: no attention is needed
                k_nope_proj(c_BTR[:, :1]), v_proj(c_BTR[:, :1])  # (their params, if this is a decode-mode init)
                return o_proj(jnp.zeros((b, t, n, dv), self.dtype))
            if t == 1:
                out_BTNv = self._absorbed_step(q_nope_BTNd, q_rope_BTNr, written, k_nope_proj, v_proj)
                return o_proj(constrain(out_BTNv, ("batch", "length", "activation_heads", None)))
            segment_ids_BT = written[2]  # a prompt chunk (from slot 0) attends within itself
        elif self.decode and self.kv_cache != "full":
            raise ValueError(f"kv_cache must be one of {KV_CACHES}, got {self.kv_cache!r}")

        k_nope_BTNd, v_BTNv = k_nope_proj(c_BTR), v_proj(c_BTR)
        q_BTNH = jnp.concatenate([q_nope_BTNd, q_rope_BTNr], axis=-1)
        k_BTNH = jnp.concatenate([k_nope_BTNd, jnp.broadcast_to(k_rope_BT1r, (b, t, n, dr))], axis=-1)
        if self.decode and self.kv_cache == "full":
            out_BTNv = self._attend_with_cache(q_BTNH, k_BTNH, v_BTNv, segment_ids_BT)
        else:
            out_BTNv = kernels.attention(q_BTNH, k_BTNH, v_BTNv, causal=True, segment_ids=segment_ids_BT,
                                         scale=self.scale, implementation=self.attention_impl,
                                         context_parallel=None if self.decode else self.context_parallel)
        return o_proj(constrain(out_BTNv, ("batch", "length", "activation_heads", None)))

    def _absorbed_step(self, q_nope_B1Nd, q_rope_B1Nr, written, k_nope_proj, v_proj):
        """One token over every written latent slot: W_uk folded into the query, W_uv after."""
        arrays, cached_ids_BS, ids_B1, i = written
        latent_BSL = arrays["latent"]
        r = self.kv_lora_rank
        w_uk_RNd = nn.unbox(k_nope_proj.variables["params"]["kernel"]).astype(self.dtype)
        w_uv_RNv = nn.unbox(v_proj.variables["params"]["kernel"]).astype(self.dtype)
        q_lat_B1NR = jnp.einsum("btnd,rnd->btnr", q_nope_B1Nd, w_uk_RNd)
        q_B1NL = jnp.concatenate([q_lat_B1NR, q_rope_B1Nr], axis=-1)
        kv_BS1L = latent_BSL[:, :, None, :]
        slot_S = jnp.arange(cached_ids_BS.shape[1])
        visible_BS = (cached_ids_BS > 0) & (slot_S <= i)[None]
        # one query a step is memory-bound; the reference ("xla") takes the value dim R < R + Dr natively
        o_B1NR = kernels.attention(q_B1NL, kv_BS1L, kv_BS1L[..., :r], scale=self.scale, implementation="xla",
                                   segment_ids=(ids_B1, visible_BS.astype(jnp.int32)))
        return jnp.einsum("btnr,rnv->btnv", o_B1NR, w_uv_RNv)

    def _attend_with_cache(self, q_BTNH, k_BTNH, v_BTNv, segment_ids_BT):
        """kv_cache="full": the prefill (T > 1, from slot 0) attends within itself; one token over
        every written slot."""
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
