"""Multi-head / grouped-query self-attention through `kernels.attention`, with a KV cache for decoding."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

import kernels
from zoo.nn.linear import Dense, param_with_axes
from zoo.nn.masks import chunked_segment_ids
from zoo.nn.norms import RMSNorm
from zoo.nn.rope import apply_rope, rope_attention_factor, rope_inv_freq
from zoo.sharding import constrain


class SelfAttention(nn.Module):
    """Multi-head / grouped-query self-attention through `kernels.attention`.

    q_proj [D, N, H], k_proj/v_proj [D, K, H], o_proj [N, H, D]. Optional q/k bias
    (GPT-2, Qwen2), q/k RMSNorm per head (Qwen3, Gemma 3 with (1 + w)) or over the whole
    projection (OLMo 2), RoPE, sliding window, logit scale and soft cap (Gemma 2).

    Layers of one scanned stack may differ in window and RoPE (Gemma 2/3's local and global
    layers, SmolLM3's NoPE layers, Llama 4's chunked RoPE and full NoPE layers): `layer_kinds`
    lists the distinct (sliding_window, rope_theta, rope_scaling, chunk) kinds and
    `layer_kind_ids` each layer's; the call then takes the layer index and switches between the
    kinds (same parameters, another mask/rotation).

    Llama 4: a chunked kind attends only within chunks of `chunk` tokens (counted from each
    segment's first token, zoo.nn.masks.chunked_segment_ids); RoPE kinds L2-normalise q and k
    after the rotation (`qk_l2_norm_eps`); NoPE kinds scale q by the attention temperature
    log1p(floor((i + 1) / floor_scale)) * attn_scale + 1 of the token's array index i
    (`temperature_tuning` = (floor_scale, attn_scale)), as transformers does.
    """

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    qkv_bias: bool = False
    out_bias: bool = False
    qk_norm_eps: float | None = None
    qk_norm_offset: bool = False  # Gemma 3: q/k norms scale by (1 + w)
    qk_norm_flat: bool = False  # OLMo 2: q/k norms over all heads of the projection, not per head
    rope_theta: float | None = None
    rope_scaling: tuple | None = None
    rotary_dim: int | None = None  # Phi-4-mini: RoPE on the first rotary_dim of head_dim only (None: all)
    sliding_window: int | None = None
    layer_kinds: tuple | None = None  # distinct (sliding_window, rope_theta, rope_scaling); overrides the three
    layer_kind_ids: tuple[int, ...] | None = None  # per layer: its index into layer_kinds
    scale: float | None = None  # logit scale (default 1/sqrt(head_dim))
    logits_soft_cap: float | None = None
    sinks: bool = False  # GPT-OSS: a learned logit per head that takes softmax mass (kernels.attention)
    qk_l2_norm_eps: float | None = None  # Llama 4: parameter-free RMS norm of q and k after RoPE (RoPE kinds)
    temperature_tuning: tuple[float, float] | None = None  # Llama 4: (floor_scale, attn_scale), NoPE kinds
    causal: bool = True
    # Not causal (ModernBERT's local layers): the window reaches both ways, |i - j| <= sliding_window.
    # kernels.attention's window only reaches back, so these layers run "xla" with the window as a bias.
    window_both_ways: bool = False
    attention_impl: str | None = None
    # kernels.attention's context_parallel ("allgather" / "ring"), never when decoding: acts only where the
    # rules split "length" over several devices, on rows in zig-zag order (zoo.objectives.to_context_order).
    context_parallel: str | None = None
    decode: bool = False  # keep a KV cache in the "cache" collection (zoo/inference/decoder.py)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def _per_kind(self, layer, fn, *args):
        """fn(kind, *args) for this layer's kind: a lax.switch on the layer index when layers differ."""
        kinds = self.layer_kinds or ((self.sliding_window, self.rope_theta, self.rope_scaling, None),)
        if len(kinds) == 1:
            return fn(kinds[0], *args)
        if layer is None:
            raise ValueError("layers of different kinds need the layer index")
        kind = jnp.asarray(self.layer_kind_ids, jnp.int32)[layer]
        return jax.lax.switch(kind, [lambda *a, k=k: fn(k, *a) for k in kinds], *args)

    def _rotate(self, kind, q_BTNH, k_BSKH, positions_BT, index_offset):
        theta, scaling = kind[1], kind[2]
        if theta is None:  # NoPE
            if self.temperature_tuning is not None:
                floor_scale, attn_scale = self.temperature_tuning
                index_T = (index_offset + jnp.arange(q_BTNH.shape[1])).astype(jnp.float32)
                scale_T = jnp.log1p(jnp.floor((index_T + 1.0) / floor_scale)) * attn_scale + 1.0
                q_BTNH = (q_BTNH.astype(jnp.float32) * scale_T[None, :, None, None]).astype(q_BTNH.dtype)
            return q_BTNH, k_BSKH
        r = self.rotary_dim or self.head_dim
        inv_freq = rope_inv_freq(r, theta, scaling, positions_BT)
        factor = rope_attention_factor(scaling)

        def rotate(x):
            x_rot = apply_rope(x[..., :r], positions_BT, inv_freq)
            if factor != 1.0:  # YaRN and LongRoPE scale cos and sin
                x_rot = x_rot * jnp.asarray(factor, x.dtype)
            x = x_rot if r == self.head_dim else jnp.concatenate([x_rot, x[..., r:]], axis=-1)
            if self.qk_l2_norm_eps is not None:
                x32 = x.astype(jnp.float32)
                x = (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + self.qk_l2_norm_eps)).astype(x.dtype)
            return x

        return rotate(q_BTNH), rotate(k_BSKH)

    def attend_kind(self, kind, q, k, v, *, causal, segment_ids, sinks=None):
        """`attend` with this kind's window, or within its chunks (a chunked kind's window is the
        chunk: keys of one chunk are never farther apart, and the flash kernels skip the rest)."""
        chunk = kind[3]
        if chunk is None:
            return self.attend(q, k, v, causal=causal, segment_ids=segment_ids, sliding_window=kind[0], sinks=sinks)
        ids = chunked_segment_ids(segment_ids, q.shape[0], q.shape[1], chunk)
        return self.attend(q, k, v, causal=causal, segment_ids=ids, sliding_window=chunk, sinks=sinks)

    def attend(self, q, k, v, *, causal, segment_ids, sliding_window, sinks=None):
        if self.window_both_ways and sliding_window is not None and not causal:
            offset_TS = jnp.arange(k.shape[1])[None, :] - jnp.arange(q.shape[1])[:, None]
            bias_11TS = jnp.where(jnp.abs(offset_TS) <= sliding_window, 0.0, -1e30)[None, None]
            return kernels.attention(q, k, v, segment_ids=segment_ids, scale=self.scale, bias=bias_11TS,
                                     logits_soft_cap=self.logits_soft_cap, sinks=sinks, implementation="xla")
        return kernels.attention(q, k, v, causal=causal, segment_ids=segment_ids, sliding_window=sliding_window,
                                 scale=self.scale, logits_soft_cap=self.logits_soft_cap, sinks=sinks,
                                 implementation=self.attention_impl,
                                 context_parallel=None if self.decode else self.context_parallel)

    @nn.compact
    def __call__(self, x_BTD, positions_BT, segment_ids_BT, layer=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        n, k, h = self.num_heads, self.num_kv_heads, self.head_dim
        q_BTNH = Dense((n, h), ("embed",), ("heads", "head_dim"), use_bias=self.qkv_bias, name="q_proj", **kw)(x_BTD)
        k_BSKH = Dense((k, h), ("embed",), ("kv_heads", "head_dim"), use_bias=self.qkv_bias, name="k_proj", **kw)(x_BTD)
        v_BSKH = Dense((k, h), ("embed",), ("kv_heads", "head_dim"), use_bias=self.qkv_bias, name="v_proj", **kw)(x_BTD)
        if self.qk_norm_eps is not None:
            q_axes, k_axes = (("heads", "head_dim"), ("kv_heads", "head_dim")) if self.qk_norm_flat else \
                ("head_dim", "head_dim")
            norm = lambda axes, name: RMSNorm(self.qk_norm_eps, self.qk_norm_offset, axis_name=axes, name=name, **kw)
            q_BTNH = norm(q_axes, "q_norm")(q_BTNH)
            k_BSKH = norm(k_axes, "k_norm")(k_BSKH)
        index_offset = jnp.int32(0)  # the array index of the first token (Llama 4's temperature)
        if self.decode and self.has_variable("cache", "index"):
            index_offset = self.get_variable("cache", "index")
        q_BTNH, k_BSKH = self._per_kind(layer, self._rotate, q_BTNH, k_BSKH, positions_BT, index_offset)
        sinks = None  # created here: no param may be created inside the kind switch
        if self.sinks:
            sinks = self.param("sinks", param_with_axes(nn.initializers.zeros, ("heads",)), (n,),
                               self.param_dtype).astype(jnp.float32)
        if self.decode:
            out_BTNH = self._attend_with_cache(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, layer, sinks)
        else:
            out_BTNH = self._per_kind(layer, lambda kind, q, k, v, ids: self.attend_kind(
                kind, q, k, v, causal=self.causal, segment_ids=ids, sinks=sinks),
                q_BTNH, k_BSKH, v_BSKH, segment_ids_BT)
        out_BTNH = constrain(out_BTNH, ("batch", "length", "activation_heads", None))
        return Dense((self.hidden_size,), ("heads", "head_dim"), ("embed",), use_bias=self.out_bias,
                     name="o_proj", **kw)(out_BTNH)

    def _attend_with_cache(self, q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, layer=None, sinks=None):
        """Writes this chunk's keys/values at the cache index, then attends.

        The cache is created at its full length by `init` on a [B, max_len] input.
        A chunk of T > 1 tokens is the prefill (written from index 0, attending within
        itself, so the fused kernel serves it); a single token attends over every
        written slot (within the sliding window, if any).
        """
        cached = write_kv_cache(self, k_BTKH, v_BTKH, segment_ids_BT)
        if cached is None:
            return jnp.zeros_like(q_BTNH)
        keys_BSKH, values_BSKH, cached_ids_BS, ids_BT, i = cached
        t = q_BTNH.shape[1]
        if t > 1:
            return self._per_kind(layer, lambda kind, q, k, v: self.attend_kind(
                kind, q, k, v, causal=True, segment_ids=ids_BT, sinks=sinks), q_BTNH, k_BTKH, v_BTKH)
        slot_S = jnp.arange(cached_ids_BS.shape[1])

        def one_token(kind, q, keys, values, cached_ids):
            visible_BS = (cached_ids > 0) & (slot_S <= i)[None]
            if kind[0] is not None:
                visible_BS &= (slot_S > i - kind[0])[None]
            if kind[3] is not None:  # Llama 4: only the keys of this token's chunk
                first_B = jnp.argmax(cached_ids > 0, axis=1)  # the prompt's left padding
                chunk_BS = (slot_S[None] - first_B[:, None]) // kind[3]
                visible_BS &= chunk_BS == ((i - first_B) // kind[3])[:, None]
            return self.attend(q, keys, values, causal=False, segment_ids=(ids_BT, visible_BS.astype(jnp.int32)),
                               sliding_window=None, sinks=sinks)

        return self._per_kind(layer, one_token, q_BTNH, keys_BSKH, values_BSKH, cached_ids_BS)


def write_cache(module: nn.Module, entries: dict, segment_ids_BT):
    """Writes a chunk's arrays and segment ids into `module`'s "cache" collection at the cache
    index (call from the module's compact method). `entries` maps a cache name to (array [B, T, ...],
    its logical axis names, "batch" and "kv_length" first).

    `init` on a [B, max_len] input creates the cache at its full length and gets None. Otherwise
    returns ({name: cached array [B, S, ...]}, cached segment ids [B, S], the chunk's ids [B, T],
    the index the chunk was written at); the index then moves on by T.
    """
    first = next(iter(entries.values()))[0]
    b, t = first.shape[:2]
    is_init = not module.has_variable("cache", "segment_ids")
    cached = {name: module.variable("cache", name, jnp.zeros, x.shape, x.dtype) for name, (x, _) in entries.items()}
    cached_ids = module.variable("cache", "segment_ids", jnp.zeros, (b, t), jnp.int32)
    index = module.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
    ids_BT = jnp.ones((b, t), jnp.int32) if segment_ids_BT is None else segment_ids_BT.astype(jnp.int32)
    if is_init:
        return None
    i = index.value
    for name, (x, names) in entries.items():
        start = (0, i) + (0,) * (x.ndim - 2)
        cached[name].value = constrain(jax.lax.dynamic_update_slice(cached[name].value, x, start), names)
    cached_ids.value = jax.lax.dynamic_update_slice(cached_ids.value, ids_BT, (0, i))
    index.value = i + t
    return {name: var.value for name, var in cached.items()}, cached_ids.value, ids_BT, i


def write_kv_cache(module: nn.Module, k_BTKH, v_BTKH, segment_ids_BT):
    """`write_cache` of keys [B, T, K, H] and values [B, T, K, Hv]: None at init, else (keys
    [B, S, K, H], values [B, S, K, Hv], cached segment ids [B, S], the chunk's ids [B, T], the
    index the chunk was written at)."""
    names = ("batch", "kv_length", "kv_heads", "head_dim")
    written = write_cache(module, {"key": (k_BTKH, names), "value": (v_BTKH, names)}, segment_ids_BT)
    if written is None:
        return None
    arrays, cached_ids_BS, ids_BT, i = written
    return arrays["key"], arrays["value"], cached_ids_BS, ids_BT, i
