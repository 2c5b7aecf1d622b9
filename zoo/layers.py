"""Shared pure building blocks: dense layers with logical axes, norms, RoPE, MLPs,
attention and the pre-norm decoder block, plus the layer scan.

Letter legend (STYLE.md): B batch, T/S length, D model dim, N heads, K kv heads,
H head dim, F mlp, V vocab, L layers.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

import kernels
from zoo.sharding import constrain

Array = jax.Array

default_init = nn.initializers.normal(stddev=0.02)


def dtype_of(name: str):
    """jnp dtype from a config string."""
    return jnp.dtype(name)


def param_with_axes(init: Callable, names: tuple[str | None, ...]) -> Callable:
    """An initializer whose parameter carries logical axis names."""
    return nn.with_logical_partitioning(init, names)


class Dense(nn.Module):
    """DenseGeneral over the last `len(in_axes)` dims with logical axis names.

    The kernel has shape in_shape + out_shape, axes in_axes + out_axes.
    """

    features: tuple[int, ...]
    in_axes: tuple[str | None, ...]
    out_axes: tuple[str | None, ...]
    use_bias: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Callable = default_init

    @nn.compact
    def __call__(self, x):
        n_in = len(self.in_axes)
        in_shape = x.shape[-n_in:]
        kernel = self.param(
            "kernel", param_with_axes(self.kernel_init, self.in_axes + self.out_axes),
            in_shape + tuple(self.features), self.param_dtype,
        )
        x = x.astype(self.dtype)
        kernel = kernel.astype(self.dtype)
        letters = "abcdefgh"
        lhs = "Z" + letters[:n_in]
        rhs = letters[:n_in] + "uvwxy"[: len(self.features)]
        out = "Z" + "uvwxy"[: len(self.features)]
        batch_shape = x.shape[:-n_in]
        y = jnp.einsum(f"{lhs},{rhs}->{out}", x.reshape((-1,) + in_shape), kernel)
        y = y.reshape(batch_shape + tuple(self.features))
        if self.use_bias:
            bias = self.param("bias", param_with_axes(nn.initializers.zeros, self.out_axes),
                              tuple(self.features), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


class RMSNorm(nn.Module):
    """RMSNorm computed in float32. `offset`: Gemma's (1 + w) scaling with w init 0."""

    eps: float = 1e-6
    offset: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    axis_name: str = "embed"

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.zeros if self.offset else nn.initializers.ones
        scale = self.param("scale", param_with_axes(init, (self.axis_name,)), (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.offset:  # Gemma multiplies in float32 before casting back
            return (normed * (1.0 + scale.astype(jnp.float32))).astype(self.dtype)
        return normed.astype(self.dtype) * scale.astype(self.dtype)


class LayerNorm(nn.Module):
    """LayerNorm with bias, statistics in float32."""

    eps: float = 1e-5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        scale = self.param("scale", param_with_axes(nn.initializers.ones, ("embed",)), (d,), self.param_dtype)
        bias = self.param("bias", param_with_axes(nn.initializers.zeros, ("embed",)), (d,), self.param_dtype)
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


class Embed(nn.Module):
    """Token embedding table [V, D]; `attend` gives tied output logits."""

    num_embeddings: int
    features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    axes: tuple[str, str] = ("vocab", "embed")

    def setup(self):
        self.embedding = self.param("embedding", param_with_axes(default_init, self.axes),
                                    (self.num_embeddings, self.features), self.param_dtype)

    def __call__(self, ids_BT):
        return jnp.take(self.embedding, ids_BT, axis=0).astype(self.dtype)

    def attend(self, x_BTD):
        return jnp.einsum("BTD,VD->BTV", x_BTD.astype(self.dtype), self.embedding.astype(self.dtype))


def rope_frequencies(head_dim: int, theta: float, scaling: tuple | None = None) -> Array:
    """Inverse frequencies [H/2], with Llama-3's piecewise frequency scaling if given."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if scaling is None:
        return inv_freq
    factor, low_freq_factor, high_freq_factor, original_max = scaling
    low_wavelen = original_max / low_freq_factor
    high_wavelen = original_max / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_max / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(is_medium, smoothed, scaled)


def apply_rope(x_BTNH: Array, positions_BT: Array, inv_freq: Array) -> Array:
    """Rotary embedding in the half-split (GPT-NeoX / HF) layout."""
    angles_BTh = positions_BT[..., None].astype(jnp.float32) * inv_freq
    angles_BTH = jnp.concatenate([angles_BTh, angles_BTh], axis=-1)
    cos = jnp.cos(angles_BTH)[:, :, None, :].astype(x_BTNH.dtype)
    sin = jnp.sin(angles_BTH)[:, :, None, :].astype(x_BTNH.dtype)
    x1, x2 = jnp.split(x_BTNH, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x_BTNH * cos + rotated * sin


ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
}


class MLP(nn.Module):
    """Feed-forward: gated (SwiGLU/GeGLU: gate_proj, up_proj, down_proj) or plain (fc_in, fc_out)."""

    hidden_size: int
    intermediate_size: int
    activation: str
    gated: bool
    use_bias: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BTD):
        dense = lambda feats, i, o, name: Dense((feats,), i, o, use_bias=self.use_bias, dtype=self.dtype,
                                                param_dtype=self.param_dtype, name=name)
        act = ACTIVATIONS[self.activation]
        if self.gated:
            h_BTF = act(dense(self.intermediate_size, ("embed",), ("mlp",), "gate_proj")(x_BTD))
            h_BTF = h_BTF * dense(self.intermediate_size, ("embed",), ("mlp",), "up_proj")(x_BTD)
        else:
            h_BTF = act(dense(self.intermediate_size, ("embed",), ("mlp",), "fc_in")(x_BTD))
        h_BTF = constrain(h_BTF, ("batch", "length", "activation_mlp"))
        out_name = "down_proj" if self.gated else "fc_out"
        return dense(self.hidden_size, ("mlp",), ("embed",), out_name)(h_BTF)


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
    decode: bool = False  # keep a KV cache in the "cache" collection (zoo.generate)
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


class DecoderBlock(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(x)). Scanned over layers.

    `make_norm`, `make_attention` and `make_mlp` build the family's pieces, so GPT-2
    and the Llama family share one block.
    """

    make_norm: Callable[[str], nn.Module]
    make_attention: Callable[[], nn.Module]
    make_mlp: Callable[[], nn.Module]

    @nn.compact
    def __call__(self, x_BTD, positions_BT, segment_ids_BT):
        x_BTD = constrain(x_BTD, ("batch", "length", "activation_embed"))
        attn = self.make_attention(name="attn")
        x_BTD = x_BTD + attn(self.make_norm(name="attn_norm")(x_BTD), positions_BT, segment_ids_BT)
        x_BTD = x_BTD + self.make_mlp(name="mlp")(self.make_norm(name="mlp_norm")(x_BTD))
        return constrain(x_BTD, ("batch", "length", "activation_embed")), None


REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "save_attention_out": jax.checkpoint_policies.save_only_these_names("attention_out"),
}


def scan_layers(block_cls: type[nn.Module], num_layers: int, remat: str, name: str = "layers", **block_kwargs):
    """The block scanned over a leading `layers` param axis, rematerialised per policy.

    Compile time stays flat in depth. The block's call signature is
    (carry, *broadcast_args) -> (carry, None).
    """
    block = block_cls
    if remat != "none":
        block = nn.remat(block, policy=REMAT_POLICIES[remat], prevent_cse=False)
    scanned = nn.scan(
        block,
        variable_axes={"params": 0, "cache": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=nn.broadcast,
        length=num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
    return scanned(name=name, **block_kwargs)


def default_positions(input_ids_BT: Array) -> Array:
    """0..T-1 for every row."""
    b, t = input_ids_BT.shape
    return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


def mask_to_segment_ids(attention_mask_BT: Array | None, segment_ids_BT: Array | None) -> Array | None:
    """HF attention_mask (1 keep, 0 pad) as segment ids (0 = padding); packing ids win."""
    if segment_ids_BT is not None:
        return segment_ids_BT.astype(jnp.int32)
    if attention_mask_BT is not None:
        return attention_mask_BT.astype(jnp.int32)
    return None
