"""Attention sinks (GPT-OSS): a learned logit per query head joins every row's softmax and
takes probability mass without a value. Every implementation that runs on CPU against an
explicit float64 softmax over [kept logits, sink] (numpy, written here), and its gradients
in q, k, v and the sinks against the reference's autodiff."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from kernels import gpu_triton, reference_attention

from kernel_utils import SMALL_GPU_BLOCKS, check_close, compiled, direct, inputs, segments

IMPLEMENTATIONS = {
    "xla": lambda q, k, v, **kw: kernels.attention(q, k, v, implementation="xla", **kw),
    "pallas": lambda q, k, v, **kw: kernels.attention(q, k, v, implementation="pallas", **kw),
    "gpu_triton": direct(gpu_triton.flash_attention, block_sizes=SMALL_GPU_BLOCKS, interpret=True),
}
# B=2, N=4, K as given, H=64; the last row of "packed_with_empty_rows" is all padding.
CASES = {
    "causal_gqa_2": dict(T=160, K=2, causal=True),
    "window_gqa_4": dict(T=200, K=1, causal=True, sliding_window=37),
    "packed_with_empty_rows": dict(T=130, K=4, causal=True,
                                   segment_ids=lambda: segments([[50, 60, 20], []], 130)),
}
SINKS = np.array([2.0, -1.0, 0.5, 4.0], np.float32)  # 4.0 outweighs most rows' logits


def _problem(name):
    c = dict(CASES[name])
    T, K = c.pop("T"), c.pop("K")
    if callable(c.get("segment_ids")):
        c["segment_ids"] = c["segment_ids"]()
    return inputs((2, T, 4, 64), (2, T, K, 64), jnp.float32, seed=3), c


def _float64_sink_softmax(q, k, v, sinks, *, causal=False, sliding_window=None, segment_ids=None):
    """out[b, t, n] = sum_s p v, p = exp(l_s) / (sum_kept exp(l) + exp(sink_n)) in float64."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, T, N, H = q.shape
    k, v = (np.repeat(x, N // x.shape[2], axis=2) for x in (k, v))
    logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(H)
    t, s = np.arange(T)[:, None], np.arange(T)[None, :]
    keep = np.ones((B, 1, T, T), bool)
    if causal:
        keep &= s <= t
    if sliding_window is not None:
        keep &= s > t - sliding_window
    if segment_ids is not None:
        ids = np.asarray(segment_ids)
        keep &= ((ids[:, :, None] == ids[:, None, :]) & (ids[:, :, None] != 0))[:, None]
    sink = np.asarray(sinks, np.float64)[None, :, None, None]
    m = np.maximum(np.where(keep, logits, -np.inf).max(-1, keepdims=True), sink)
    e = np.where(keep, np.exp(logits - m), 0.0)
    p = e / (e.sum(-1, keepdims=True) + np.exp(sink - m))
    return np.einsum("bnts,bsnh->btnh", p, v), np.broadcast_to(keep.any(-1), (B, N, T))


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
def test_sinks_match_float64_softmax_and_reference_grads(implementation, name):
    (q, k, v, do), options = _problem(name)
    sinks = jnp.asarray(SINKS)
    fn = IMPLEMENTATIONS[implementation]

    def value_and_grads(attend, q, k, v, sinks):
        loss = lambda q, k, v, s: jnp.sum(attend(q, k, v, sinks=s, **options).astype(jnp.float32) * do)
        return (attend(q, k, v, sinks=sinks, **options),) + jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, sinks)

    got = compiled(lambda *a: value_and_grads(fn, *a), q, k, v, sinks)
    want = compiled(lambda *a: value_and_grads(reference_attention, *a), q, k, v, sinks)
    exact, kept_rows = _float64_sink_softmax(q, k, v, SINKS, **options)
    check_close(got[0], exact, 1e-5, f"{implementation}/{name} out vs float64")
    for what, g, w in zip(("dq", "dk", "dv", "dsinks"), got[1:], want[1:]):
        check_close(g, w, 1e-4 * max(1.0, float(jnp.max(jnp.abs(w)))), f"{implementation}/{name} {what}")
    # the sinks take mass: without them the output differs; rows with no key stay zeros
    plain = np.asarray(fn(q, k, v, **options))
    assert np.abs(plain - np.asarray(got[0])).max() > 0.05
    empty = ~np.transpose(kept_rows, (0, 2, 1))  # [B, T, N]
    assert np.all(np.asarray(got[0])[empty] == 0)
    assert float(jnp.max(jnp.abs(got[4]))) > 1e-3  # the sink gradient is not trivially zero


def test_sinks_are_checked():
    q, k, v, _ = inputs((1, 8, 4, 64), (1, 8, 2, 64), jnp.float32)
    with pytest.raises(ValueError, match=r"one logit per query head, shape \(4,\)"):
        kernels.attention(q, k, v, sinks=jnp.zeros((2,)))
    with pytest.raises(ValueError, match="floating point"):
        kernels.attention(q, k, v, sinks=jnp.zeros((4,), jnp.int32))
    with pytest.raises(NotImplementedError, match="cudnn.*sinks"):
        kernels.attention(q, k, v, sinks=jnp.zeros((4,)), implementation="cudnn")
