"""kernels.attention with a value head dim Hv different from q/k's H (multi-head latent
attention: DeepSeek's H = 192, Hv = 128 in training; H = R + Dr > Hv = R in absorbed decoding):
"xla" and "pallas" (interpret mode on CPU), forward and dq/dk/dv, against a float64 softmax
written out here; the kernels get zero-padded heads, which must change nothing."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels


def _float64_attention(q, k, v, keep, scale):
    """softmax(scale * q.k over kept keys) v per head, GQA by repeating k/v heads; rows that keep
    nothing give zeros."""
    g = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    logits = np.einsum("btnh,bsnh->bnts", q, k) * scale
    logits = np.where(keep[:, None], logits, -np.inf)
    top = np.max(logits, -1, keepdims=True)
    w = np.where(keep[:, None], np.exp(logits - np.where(np.isfinite(top), top, 0.0)), 0.0)
    w = w / np.maximum(w.sum(-1, keepdims=True), 1e-300)
    return np.einsum("bnts,bsnh->btnh", w, v)


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
@pytest.mark.parametrize("h, hv", [(48, 32), (32, 48)])
def test_value_head_dim_differs(implementation, h, hv):
    b, t, n, kv_heads = 2, 40, 4, 2
    rng = np.random.default_rng(h + hv)
    q = rng.standard_normal((b, t, n, h))
    k = rng.standard_normal((b, t, kv_heads, h))
    v = rng.standard_normal((b, t, kv_heads, hv))
    do = rng.standard_normal((b, t, n, hv))
    ids = np.ones((b, t), np.int32)
    ids[0, 25:] = 2  # two documents in row 0
    ids[1, :6] = 0  # left padding in row 1
    scale = 0.3
    causal = np.arange(t)[None, :] <= np.arange(t)[:, None]
    keep = (ids[:, :, None] == ids[:, None, :]) & (ids[:, None, :] > 0) & causal

    def run(q, k, v):
        return kernels.attention(q, k, v, causal=True, segment_ids=jnp.asarray(ids), scale=scale,
                                 implementation=implementation)

    args = [jnp.asarray(x, jnp.float32) for x in (q, k, v)]
    out, vjp = jax.vjp(run, *args)
    assert out.shape == (b, t, n, hv)
    want = _float64_attention(q, k, v, keep, scale)
    real = ids > 0
    np.testing.assert_allclose(np.asarray(out)[real], want[real], atol=2e-5, rtol=0)
    np.testing.assert_array_equal(np.asarray(out)[~real], 0.0)  # padded queries attend nowhere
    dq, dk, dv = vjp(jnp.asarray(do, jnp.float32))
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)
    # float64 gradients of the same loss by central differences along one random direction each
    loss = lambda q, k, v: float(np.sum(_float64_attention(q, k, v, keep, scale) * do))
    for i, (x, grad) in enumerate(zip((q, k, v), (dq, dk, dv))):
        d = rng.standard_normal(x.shape)
        xs = [q, k, v]
        eps = 1e-5
        plus = loss(*[y + eps * d if j == i else y for j, y in enumerate(xs)])
        minus = loss(*[y - eps * d if j == i else y for j, y in enumerate(xs)])
        np.testing.assert_allclose(float(np.sum(np.asarray(grad, np.float64) * d)), (plus - minus) / (2 * eps),
                                   rtol=1e-4, atol=1e-3)


def test_k_and_v_must_agree_in_batch_length_and_heads():
    q = jnp.zeros((1, 8, 4, 16))
    with pytest.raises(ValueError, match="k and v must agree in batch, length and heads"):
        kernels.attention(q, jnp.zeros((1, 8, 2, 16)), jnp.zeros((1, 9, 2, 8)))
    with pytest.raises(ValueError, match="head_dim differs: q 16, k 8"):
        kernels.attention(q, jnp.zeros((1, 8, 2, 8)), jnp.zeros((1, 8, 2, 8)))
