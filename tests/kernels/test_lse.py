"""Attention that also returns each row's log-sum-exp (`kernels.api._lse_for_platform`, which
context parallelism calls per shard): "xla" (`reference.attend_with_lse`) and "pallas" (the TPU
kernel's `flash_attention_with_lse`, in interpret mode on CPU) against `reference_attention`'s
output, a float64 numpy log-sum-exp, and the gradients of a loss that uses both outputs.

Rows with nothing to attend to give out 0 and lse `base.MASK_VALUE` exactly; two calls on
disjoint key blocks merged by their lse equal one call on all keys, gradients included."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import api, base, reference_attention

from kernel_utils import check_close, compiled, inputs, segments

IMPLEMENTATIONS = ("xla", "pallas")
TOL = dict(out=1e-5, lse=1e-5, grad=1e-4)
_PACKED_Q = [(30, 30), (10, 50, 12)]  # batch row 0 ends in 12 padding rows
_PACKED_KV = [(25, 40), (60,)]  # kv has no segment 3: q rows 60..71 of batch row 1 see no key

# name -> shape and attention options; B=2, H=64, lengths not multiples of the 128-row tiles.
CASES = {
    "causal_gqa": dict(T=40, N=4, K=2, causal=True),
    "noncausal_mqa_soft_cap": dict(T=72, N=4, K=1, logits_soft_cap=2.0, scale=0.5),
    "q_shorter_causal_window": dict(T=24, S=72, N=4, K=2, causal=True, sliding_window=20),
    "packed_padding_causal": dict(
        T=72, N=4, K=1, causal=True,
        segment_ids=lambda: (segments(_PACKED_Q, 72), segments(_PACKED_KV, 72))),
    # Two q blocks; the first (positions < 0: no key) has no tile to compute in the kernel's grid.
    "q_longer_causal_empty_block": dict(T=200, S=40, N=2, K=2, causal=True),
}


def _problem(name, seed=0):
    c = dict(CASES[name])
    B, T, N, K, H = 2, c.pop("T"), c.pop("N"), c.pop("K"), 64
    S = c.pop("S", T)
    if callable(c.get("segment_ids")):
        c["segment_ids"] = c["segment_ids"]()
    q, k, v, w_out = inputs((B, T, N, H), (B, S, K, H), jnp.float32, seed)
    w_lse = jax.random.normal(jax.random.PRNGKey(seed + 1), (B, T, N), jnp.float32)
    return (q, k, v, w_out, w_lse), c


def _keep(shape_q, shape_kv, options):
    """bool [B, T, S], built here from the options' definition (not the kernels' masks)."""
    (B, T, _, _), (_, S, _, _) = shape_q, shape_kv
    q_pos = np.arange(T)[:, None] + (S - T)  # queries are the last T positions
    key_pos = np.arange(S)[None, :]
    keep = np.ones((B, T, S), bool)
    if options.get("causal") or options.get("sliding_window"):
        keep &= key_pos <= q_pos
    if options.get("sliding_window"):
        keep &= key_pos > q_pos - options["sliding_window"]
    ids = options.get("segment_ids")
    if ids is not None:
        q_ids, kv_ids = (np.asarray(x) for x in (ids if isinstance(ids, tuple) else (ids, ids)))
        keep &= (q_ids[:, :, None] == kv_ids[:, None, :]) & (q_ids[:, :, None] != 0)
    return keep


def _scaled_logits(q, k, options, xp):
    """Scaled, soft-capped logits [B, T, N, S] (xp: np in float64, or jnp)."""
    N, K, H = q.shape[2], k.shape[2], q.shape[3]
    k = xp.repeat(k, N // K, axis=2)
    s = xp.einsum("btnh,bsnh->btns", q, k) * options.get("scale", 1.0 / np.sqrt(H))
    cap = options.get("logits_soft_cap")
    return s if cap is None else cap * xp.tanh(s / cap)


def _lse64(q, k, options):
    """float64 numpy log-sum-exp of the kept logits, [B, T, N]; MASK_VALUE for empty rows."""
    s = _scaled_logits(np.asarray(q, np.float64), np.asarray(k, np.float64), options, np)
    keep = _keep(q.shape, k.shape, options)[:, :, None, :]
    m = np.max(np.where(keep, s, -np.inf), axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    total = np.sum(np.where(keep, np.exp(s - m), 0.0), axis=-1)
    empty = ~keep.any(axis=-1)
    return np.where(empty, base.MASK_VALUE, m[..., 0] + np.log(np.where(empty, 1.0, total)))


def _loss(out, lse, w_out, w_lse):
    return jnp.sum(out.astype(jnp.float32) * w_out) + jnp.sum(jnp.where(lse > -1e29, lse, 0.0) * w_lse)


def _lse_call(implementation, options):
    def call(q, k, v):
        q_ids, kv_ids, opts = base.validate(q, k, v, **options)
        return api._lse_for_platform(implementation, q, k, v, q_ids, kv_ids, opts)
    return call


def _values_and_grads(fn, q, k, v, w_out, w_lse):
    """(out, lse, dq, dk, dv) of fn -> (out, lse) for `_loss`."""
    def loss(q, k, v):
        out, lse = fn(q, k, v)
        return _loss(out, lse, w_out, w_lse), (out, lse)
    (_, (out, lse)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return (out, lse) + grads


@functools.cache
def _oracle(name):
    """(out, dq, dk, dv): out of `reference_attention`, and autodiff gradients of `_loss` with
    that out and a jnp log-sum-exp of the masked logits written here."""
    (q, k, v, w_out, w_lse), options = _problem(name)
    keep = jnp.asarray(_keep(q.shape, k.shape, options))[:, :, None, :]

    def fn(q, k, v):
        s = jnp.where(keep, _scaled_logits(q, k, options, jnp), base.MASK_VALUE)
        return reference_attention(q, k, v, **options), jax.nn.logsumexp(s, axis=-1)

    out, _, dq, dk, dv = compiled(lambda *a: _values_and_grads(fn, *a), q, k, v, w_out, w_lse)
    return out, dq, dk, dv


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_matches_reference(implementation, name):
    (q, k, v, w_out, w_lse), options = _problem(name)
    out, lse, *grads = compiled(lambda *a: _values_and_grads(_lse_call(implementation, options), *a),
                                q, k, v, w_out, w_lse)
    want_out, *want_grads = _oracle(name)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == q.shape[:3] and lse.dtype == jnp.float32
    what = f"{implementation}/{name}"
    check_close(out, want_out, TOL["out"], f"{what} out")
    want_lse = _lse64(q, k, options)
    check_close(lse, want_lse, TOL["lse"], f"{what} lse")
    for x, g, w in zip("qkv", grads, want_grads):
        check_close(g, w, TOL["grad"], f"{what} d{x}")
    # Rows with no key: out exactly 0, lse exactly MASK_VALUE (not MASK_VALUE + log S), dq 0.
    empty = ~_keep(q.shape, k.shape, options).any(axis=-1)  # [B, T]
    if name.startswith(("packed", "q_longer")):
        assert empty.sum() >= 12, "the case must have rows with nothing to attend to"
    out, lse, dq = (np.asarray(x) for x in (out, lse, grads[0]))
    assert np.all(out[empty] == 0) and np.all(dq[empty] == 0)
    assert np.all(lse[empty] == np.float32(base.MASK_VALUE))
    assert np.all(lse[~empty] > -1e29)


def _merge(a, b):
    """(out, lse) of attention over the keys of two calls (out, lse) on disjoint key blocks."""
    (o1, l1), (o2, l2) = a, b
    m = jax.lax.stop_gradient(jnp.maximum(l1, l2))
    w1, w2 = jnp.exp(l1 - m), jnp.exp(l2 - m)
    total = w1 + w2
    out = (o1 * w1[..., None] + o2 * w2[..., None]) / total[..., None]
    return out.astype(o1.dtype), m + jnp.log(total)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_merging_key_blocks_matches_one_call(implementation):
    """Keys split at S1 = 40 of 72 (not causal: segment masks do not depend on positions);
    some q rows have keys in one block only, some in none."""
    T, S, S1 = 72, 72, 40
    q_ids, kv_ids = segments(_PACKED_Q, T), segments(_PACKED_KV, S)
    q, k, v, w_out = inputs((2, T, 4, 64), (2, S, 2, 64), jnp.float32, seed=3)
    w_lse = jax.random.normal(jax.random.PRNGKey(4), (2, T, 4), jnp.float32)
    opts = dict(logits_soft_cap=3.0)
    whole = _lse_call(implementation, dict(opts, segment_ids=(q_ids, kv_ids)))

    def merged(q, k, v):
        first = _lse_call(implementation, dict(opts, segment_ids=(q_ids, kv_ids[:, :S1])))(q, k[:, :S1], v[:, :S1])
        second = _lse_call(implementation, dict(opts, segment_ids=(q_ids, kv_ids[:, S1:])))(q, k[:, S1:], v[:, S1:])
        return _merge(first, second)

    both = compiled(lambda *a: (_values_and_grads(whole, *a), _values_and_grads(merged, *a)), q, k, v, w_out, w_lse)
    for what, want, got in zip(("out", "lse", "dq", "dk", "dv"), *both):
        tol = TOL["grad"] if what.startswith("d") else TOL[what]
        if what == "lse":  # both empty: MASK_VALUE + log 2 rounds back to MASK_VALUE in float32
            assert np.array_equal(np.asarray(got) < -1e29, np.asarray(want) < -1e29)
            got, want = (np.where(np.asarray(x) < -1e29, 0.0, x) for x in (got, want))
        check_close(got, want, tol, f"{implementation} merged {what}")


def test_pallas_gradient_is_the_kernels_backward():
    """The "pallas" gradient runs the dq and dk/dv kernels (the custom_vjp), not autodiff of the
    interpreted forward kernel."""
    (q, k, v, w_out, w_lse), options = _problem("causal_gqa")
    fn = _lse_call("pallas", options)
    jaxpr = str(jax.make_jaxpr(lambda *a: _values_and_grads(fn, *a))(q, k, v, w_out, w_lse))
    assert "flash_dq" in jaxpr and "flash_dkv" in jaxpr


def test_lowering_picks_the_kernel_per_platform():
    """TPU: the Mosaic kernel (fwd, dq, dk/dv); CUDA: an error when lowered (not for "xla", the
    reference everywhere); CPU: interpret mode for "pallas", the reference for None."""
    q = jnp.zeros((1, 256, 2, 64), jnp.bfloat16)

    def lowered(implementation, platform):
        fn = lambda q: _loss(*_lse_call(implementation, dict(causal=True))(q, q, q), 1.0, 1.0)
        return jax.jit(jax.grad(fn)).trace(q).lower(lowering_platforms=(platform,)).as_text()

    assert lowered("pallas", "tpu").count("tpu_custom_call") == 3
    assert "stablehlo.while" in lowered("pallas", "cpu") and "stablehlo.while" not in lowered(None, "cpu")
    assert "custom_call" not in lowered("xla", "cuda")
    for implementation in (None, "pallas"):
        with pytest.raises(NotImplementedError, match="context parallelism on GPUs is not implemented yet"):
            lowered(implementation, "cuda")
