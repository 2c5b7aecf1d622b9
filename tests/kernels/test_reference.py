"""`kernels.reference_attention` (the specification) against an independent float64
numpy implementation written with explicit positions, repeated kv heads and a
loop over heads; plus the errors `kernels.attention` raises for bad calls."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from kernels import reference_attention


def numpy_attention(q, k, v, *, causal=False, segment_ids=None, scale=None,
                    sliding_window=None, logits_soft_cap=None, bias=None):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    scale = 1 / math.sqrt(H) if scale is None else scale
    k = np.repeat(k, N // K, axis=2)  # head n reads kv head n // (N // K)
    v = np.repeat(v, N // K, axis=2)
    if segment_ids is None:
        q_ids, kv_ids = np.ones((B, T), int), np.ones((B, S), int)
    elif isinstance(segment_ids, tuple):
        q_ids, kv_ids = (np.asarray(x) for x in segment_ids)
    else:
        q_ids = kv_ids = np.asarray(segment_ids)
    bias = None if bias is None else np.broadcast_to(np.asarray(bias, np.float64), (B, N, T, S))
    out = np.zeros((B, T, N, H))
    for b in range(B):
        for n in range(N):
            for i in range(T):
                pos = i + S - T
                keep = (q_ids[b, i] != 0) & (kv_ids[b] == q_ids[b, i])
                j = np.arange(S)
                if causal:
                    keep &= j <= pos
                if sliding_window is not None:
                    keep &= (j > pos - sliding_window) & (j <= pos)
                if not keep.any():
                    continue
                x = scale * k[b, :, n] @ q[b, i, n]
                if logits_soft_cap is not None:
                    x = logits_soft_cap * np.tanh(x / logits_soft_cap)
                if bias is not None:
                    x = x + bias[b, n, i]
                x = np.where(keep, x, -np.inf)
                p = np.exp(x - x.max())
                out[b, i, n] = (p / p.sum()) @ v[b, :, n]
    return out


def _qkv(B, T, S, N, K, H, seed=0, dtype=jnp.float32):
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (jax.random.normal(kq, (B, T, N, H), dtype), jax.random.normal(kk, (B, S, K, H), dtype),
            jax.random.normal(kv, (B, S, K, H), dtype))


def _packed_ids():
    # Row 0: three segments and padding; row 1: fully padded except one segment
    # that starts mid-row (the first 5 rows attend to nothing).
    ids = np.zeros((2, 24), np.int32)
    ids[0, :7], ids[0, 7:15], ids[0, 15:20] = 1, 2, 3
    ids[1, 5:21] = 4
    return jnp.asarray(ids)


CASES = {
    "plain": dict(),
    "causal": dict(causal=True),
    "segments_with_padding": dict(segment_ids=_packed_ids()),
    "causal_segments": dict(causal=True, segment_ids=_packed_ids()),
    "gqa_8_to_1": dict(N=8, K=1, causal=True),
    "gqa_4_to_2": dict(N=4, K=2),
    "sliding_window": dict(causal=True, sliding_window=5),
    "sliding_window_only": dict(sliding_window=3),
    "soft_cap": dict(logits_soft_cap=1.5, scale=1.0),
    "bias": dict(bias="full"),
    "bias_broadcast_heads": dict(bias="heads"),
    "soft_cap_and_bias": dict(logits_soft_cap=2.0, bias="full", causal=True),
    "q_shorter_causal": dict(T=7, causal=True),
    "q_longer_causal": dict(T=30, S=24, causal=True),
    "q_shorter_window_segments": dict(T=9, causal=True, sliding_window=6, segment_ids="pair"),
    "head_dim_96": dict(H=96, causal=True),
    "head_dim_128": dict(H=128),
    "scale": dict(scale=0.3),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_numpy(name):
    c = dict(CASES[name])
    B, T, S, N, K, H = 2, c.pop("T", 24), c.pop("S", 24), c.pop("N", 4), c.pop("K", 2), c.pop("H", 64)
    q, k, v = _qkv(B, T, S, N, K, H)
    if c.get("bias") == "full":
        c["bias"] = jax.random.normal(jax.random.PRNGKey(7), (B, N, T, S))
    elif c.get("bias") == "heads":
        c["bias"] = jax.random.normal(jax.random.PRNGKey(7), (1, N, T, S))
    if isinstance(c.get("segment_ids"), str):
        kv_ids = jnp.asarray(np.repeat([[1, 2, 0]], 8, axis=0).T.reshape(1, 24).repeat(B, 0))
        c["segment_ids"] = (kv_ids[:, S - T:], kv_ids)
    out = reference_attention(q, k, v, **c)
    assert out.dtype == q.dtype and out.shape == q.shape
    np.testing.assert_allclose(out, numpy_attention(q, k, v, **c), atol=1e-5, rtol=0)


def test_fully_padded_rows_are_zero_with_finite_grads():
    q, k, v = _qkv(2, 24, 24, 4, 2, 64)
    ids = _packed_ids()
    out = reference_attention(q, k, v, segment_ids=ids, causal=True)
    padded = np.asarray(ids) == 0
    assert np.all(np.asarray(out)[padded] == 0)
    grads = jax.grad(lambda q, k, v: jnp.sum(
        reference_attention(q, k, v, segment_ids=ids, causal=True) ** 2), (0, 1, 2))(q, k, v)
    for g in grads:
        assert np.all(np.isfinite(g))
    assert np.all(np.asarray(grads[0])[padded] == 0)


def test_no_key_at_all_gives_zeros():
    # Causal with more queries than keys: the first T - S queries precede every key.
    q, k, v = _qkv(1, 10, 4, 2, 2, 64)
    out = np.asarray(reference_attention(q, k, v, causal=True))
    assert np.all(out[:, :6] == 0) and np.all(np.abs(out[:, 6:]).sum(-1) > 0)


def test_bf16_output_dtype():
    q, k, v = _qkv(1, 16, 16, 2, 1, 64, dtype=jnp.bfloat16)
    out = reference_attention(q, k, v, causal=True)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32),
                               numpy_attention(q, k, v, causal=True), atol=2e-2)


@pytest.mark.parametrize("kwargs, match", [
    (dict(k_shape=(2, 16, 3, 64)), "kv heads"),
    (dict(k_shape=(2, 16, 2, 32)), "head_dim"),
    (dict(k_shape=(3, 16, 2, 64)), "batch"),
    (dict(segment_ids=jnp.ones((2, 15), jnp.int32)), "segment ids"),
    (dict(segment_ids=jnp.ones((2, 16), jnp.float32)), "integers"),
    (dict(segment_ids=jnp.ones((2, 16), jnp.int32), k_shape=(2, 12, 2, 64)), "pair"),
    (dict(implementation="flash"), "expected None or one of"),
    (dict(sliding_window=0), "sliding_window"),
    (dict(logits_soft_cap=-1.0), "logits_soft_cap"),
    (dict(bias=jnp.zeros((2, 3, 16, 16))), "bias shape"),
])
def test_attention_rejects_bad_calls(kwargs, match):
    kwargs = dict(kwargs)
    q = jnp.zeros((2, 16, 4, 64))
    k = jnp.zeros(kwargs.pop("k_shape", (2, 16, 2, 64)))
    with pytest.raises(ValueError, match=match):
        kernels.attention(q, k, k, **kwargs)


def test_kernels_reject_bias_and_cudnn_unsupported_features():
    q = jnp.zeros((1, 16, 2, 64))
    with pytest.raises(NotImplementedError, match="bias"):
        kernels.attention(q, q, q, bias=jnp.zeros((16, 16)), implementation="pallas")
    with pytest.raises(NotImplementedError, match="soft cap"):
        kernels.attention(q, q, q, logits_soft_cap=5.0, implementation="cudnn")
    with pytest.raises(NotImplementedError, match="segment ids"):
        kernels.attention(q, q, q, segment_ids=jnp.ones((1, 16), jnp.int32), implementation="cudnn")
