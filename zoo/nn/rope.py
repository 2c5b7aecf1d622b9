"""Rotary position embeddings (RoPE), with linear, Llama-3 and YaRN frequency scaling."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def rope_frequencies(head_dim: int, theta: float, scaling: tuple | None = None) -> jax.Array:
    """Inverse frequencies [H/2]. `scaling`: None; (factor,) for linear scaling (positions
    divided by factor: Gemma 3's global layers); (factor, low_freq_factor, high_freq_factor,
    original_max_position) for Llama-3's piecewise frequency scaling; or ("yarn", factor,
    beta_fast, beta_slow, original_max_position, truncate) for YaRN (GPT-OSS), whose
    rotated q and k are also multiplied by `rope_attention_factor`. LongRoPE (Phi-3) picks its
    frequencies per call: `rope_inv_freq`."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if scaling is None:
        return inv_freq
    if len(scaling) == 1:
        return inv_freq / scaling[0]
    if scaling[0] == "yarn":
        return _yarn_frequencies(head_dim, theta, *scaling[1:])
    factor, low_freq_factor, high_freq_factor, original_max = scaling
    low_wavelen = original_max / low_freq_factor
    high_wavelen = original_max / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_max / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(is_medium, smoothed, scaled)


def _yarn_frequencies(head_dim, theta, factor, beta_fast, beta_slow, original_max, truncate):
    """YaRN (Peng et al. 2023): dimensions that turn more than beta_fast times over the original
    context keep their frequency, those under beta_slow times are divided by `factor`, and a
    linear ramp blends the ones between (HF's `_compute_yarn_parameters`)."""
    def correction_dim(rotations):
        return head_dim * math.log(original_max / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = jnp.clip((jnp.arange(head_dim // 2, dtype=jnp.float32) - low) / (high - low), 0.0, 1.0)
    pos_freqs = theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    return interpolation * ramp + extrapolation * (1.0 - ramp)


def rope_attention_factor(scaling: tuple | None) -> float:
    """What cos and sin are multiplied by (so q.k by its square): YaRN's 0.1 ln(factor) + 1,
    LongRoPE's given factor; else 1."""
    if scaling is not None and scaling[0] == "longrope":
        return float(scaling[4])
    if scaling is None or scaling[0] != "yarn" or scaling[1] <= 1:
        return 1.0
    return 0.1 * math.log(scaling[1]) + 1.0


def rope_inv_freq(rotary_dim: int, theta: float, scaling: tuple | None, positions_BT: jax.Array) -> jax.Array:
    """Inverse frequencies [rotary_dim/2] for this call. LongRoPE, ("longrope", short_factors,
    long_factors, original_max_position, attention_factor): each frequency divided by its
    short factor, or by its long factor once the call reaches past original_max_position
    (HF's rule: max(position_ids) + 1 > original_max, over the whole batch, per forward call)."""
    if scaling is None or scaling[0] != "longrope":
        return rope_frequencies(rotary_dim, theta, scaling)
    _, short, long, original_max, _ = scaling
    base = 1.0 / (theta ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim))
    long_reached = jnp.max(positions_BT) + 1 > original_max
    return base / jnp.where(long_reached, jnp.asarray(long, jnp.float32), jnp.asarray(short, jnp.float32))


def apply_rope(x_BTNH: jax.Array, positions_BT: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotary embedding in the half-split (GPT-NeoX / HF) layout."""
    angles_BTh = positions_BT[..., None].astype(jnp.float32) * inv_freq
    angles_BTH = jnp.concatenate([angles_BTh, angles_BTh], axis=-1)
    cos = jnp.cos(angles_BTH)[:, :, None, :].astype(x_BTNH.dtype)
    sin = jnp.sin(angles_BTH)[:, :, None, :].astype(x_BTNH.dtype)
    x1, x2 = jnp.split(x_BTNH, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x_BTNH * cos + rotated * sin
