"""RMSNorm and LayerNorm, statistics in float32."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from zoo.nn.linear import param_with_axes


class RMSNorm(nn.Module):
    """RMSNorm computed in float32. `offset`: Gemma's (1 + w) scaling with w init 0."""

    eps: float = 1e-6
    offset: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    # The logical name of the normalised axis; a tuple normalises that many trailing axes
    # together (OLMo 2's q/k norm over all heads of a projection: ("heads", "head_dim")).
    axis_name: str | tuple[str, ...] = "embed"

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.zeros if self.offset else nn.initializers.ones
        names = (self.axis_name,) if isinstance(self.axis_name, str) else tuple(self.axis_name)
        axes = tuple(range(-len(names), 0))
        scale = self.param("scale", param_with_axes(init, names), x.shape[-len(names):], self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=axes, keepdims=True) + self.eps)
        if self.offset:  # Gemma multiplies in float32 before casting back
            return (normed * (1.0 + scale.astype(jnp.float32))).astype(self.dtype)
        return normed.astype(self.dtype) * scale.astype(self.dtype)


class LayerNorm(nn.Module):
    """LayerNorm, statistics in float32; `use_bias=False` drops the bias (ModernBERT)."""

    eps: float = 1e-5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    use_bias: bool = True

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        scale = self.param("scale", param_with_axes(nn.initializers.ones, ("embed",)), (d,), self.param_dtype)
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * scale.astype(jnp.float32)
        if self.use_bias:
            bias = self.param("bias", param_with_axes(nn.initializers.zeros, ("embed",)), (d,), self.param_dtype)
            y = y + bias.astype(jnp.float32)
        return y.astype(self.dtype)
