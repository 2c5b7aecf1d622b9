"""Rotary position embeddings (RoPE), with Llama-3 frequency scaling."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def rope_frequencies(head_dim: int, theta: float, scaling: tuple | None = None) -> jax.Array:
    """Inverse frequencies [H/2]. `scaling`: None; (factor,) for linear scaling (positions
    divided by factor: Gemma 3's global layers); or (factor, low_freq_factor, high_freq_factor,
    original_max_position) for Llama-3's piecewise frequency scaling."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if scaling is None:
        return inv_freq
    if len(scaling) == 1:
        return inv_freq / scaling[0]
    factor, low_freq_factor, high_freq_factor, original_max = scaling
    low_wavelen = original_max / low_freq_factor
    high_wavelen = original_max / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_max / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(is_medium, smoothed, scaled)


def apply_rope(x_BTNH: jax.Array, positions_BT: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotary embedding in the half-split (GPT-NeoX / HF) layout."""
    angles_BTh = positions_BT[..., None].astype(jnp.float32) * inv_freq
    angles_BTH = jnp.concatenate([angles_BTh, angles_BTh], axis=-1)
    cos = jnp.cos(angles_BTH)[:, :, None, :].astype(x_BTNH.dtype)
    sin = jnp.sin(angles_BTH)[:, :, None, :].astype(x_BTNH.dtype)
    x1, x2 = jnp.split(x_BTNH, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x_BTNH * cos + rotated * sin
