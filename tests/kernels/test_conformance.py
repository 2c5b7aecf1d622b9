"""The conformance suite: every attention implementation that runs on CPU against the
float32 `reference_attention`, on the same cases, forward and dq/dk/dv.

Implementations: "xla" and "pallas" through `kernels.attention` (on CPU "pallas" is
the TPU kernel in Pallas interpret mode), and the Triton GPU kernel in interpret
mode, called as `kernels.attention` calls it. Cases cover causal, packed segment
ids with padding, GQA/MQA (G = 1, 2, 4, 8), sliding windows, soft caps, q_len !=
kv_len, head dims from 64 to 256, and rows with nothing to attend to (which must
give zeros). The TPU kernel stacks the G query heads of a kv head by default
(`BlockSizes.stack_gqa`); its unstacked path runs the GQA cases as "pallas_unstacked"."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from kernels import gpu_triton, reference_attention, tpu

from kernel_utils import SMALL_GPU_BLOCKS, check_close, compiled, direct, inputs, segments, value_and_grads

IMPLEMENTATIONS = {
    "xla": lambda q, k, v, **kw: kernels.attention(q, k, v, implementation="xla", **kw),
    "pallas": lambda q, k, v, **kw: kernels.attention(q, k, v, implementation="pallas", **kw),
    "gpu_triton": direct(gpu_triton.flash_attention, block_sizes=SMALL_GPU_BLOCKS, interpret=True),
}
# Bounds on |got - ref| against the float32 reference: absolute, except bf16
# gradients, which are bounded by tol * (1 + |ref|) (see test_matches_reference for why).
TOL = {"float32": dict(fwd=1e-5, grad=1e-4), "bfloat16": dict(fwd=2e-2, grad=2e-2)}
_PACKED = [(100, 233), (333,)]

# name -> shape and attention options. Default shape: B=2, T=S=256, N=4, K=2, H=64.
CASES = {
    "plain": dict(T=64, N=2, K=2),
    "causal": dict(causal=True),
    "packed_3_segments_and_padding": dict(
        T=333, causal=True, segment_ids=lambda: segments([(100, 150, 50), (20, 200)], 333)),
    "packed_not_causal": dict(T=200, segment_ids=lambda: segments([(64, 64, 64), (1, 130)], 200)),
    # The last row is all padding: every one of its queries has nothing to attend to.
    "segments_all_padding_row": dict(
        B=3, T=60, segment_ids=lambda: segments([[10, 25, 15], [5, 17, 9, 20], []], 60)),
    "segments_all_padding_row_causal": dict(
        B=3, T=60, causal=True, segment_ids=lambda: segments([[10, 25, 15], [5, 17, 9, 20], []], 60)),
    "segment_pair_cross_lengths": dict(
        T=24, S=40, N=2, K=1,
        segment_ids=lambda: (segments([[8, 12], [20]], 24), segments([[30, 10], [15, 20]], 40))),
    "gqa_8_to_1": dict(N=8, K=1, causal=True),
    "gqa_8_to_1_ragged_segments": dict(
        N=8, K=1, T=200, segment_ids=lambda: segments([(70, 90, 30), (150,)], 200)),
    "gqa_4_to_1_window_segments_soft_cap": dict(
        T=140, S=333, N=4, K=1, causal=True, sliding_window=129, logits_soft_cap=5.0,
        segment_ids=lambda: (segments(_PACKED, 333)[:, -140:], segments(_PACKED, 333))),
    "gqa_4_to_2_noncausal": dict(T=200),
    "sliding_window": dict(T=384, causal=True, sliding_window=100),
    "sliding_window_only": dict(T=96, N=2, K=1, sliding_window=20),
    "soft_cap": dict(logits_soft_cap=1.0, scale=1.0, causal=True),
    "soft_cap_noncausal": dict(T=64, N=2, K=1, logits_soft_cap=2.0, scale=0.5),
    "soft_cap_causal_window": dict(T=50, logits_soft_cap=5.0, causal=True, sliding_window=17),
    "q_shorter_than_kv": dict(T=130, S=400, causal=True),
    "q_longer_than_kv": dict(T=300, S=140, causal=True),  # first 160 rows are empty
    "q_shorter_window": dict(T=20, S=70, N=2, K=1, sliding_window=25),
    "q_shorter_window_segments": dict(
        T=140, S=333, causal=True, sliding_window=129,
        segment_ids=lambda: (segments(_PACKED, 333)[:, -140:], segments(_PACKED, 333))),
    "ragged_lengths": dict(T=37, S=53, N=2, K=1),
    "ragged_causal": dict(T=50, N=2, K=2, causal=True),
    "head_dim_96": dict(H=96, causal=True),
    "head_dim_128": dict(H=128, T=512, N=2, K=1),
    "head_dim_192_segments": dict(
        H=192, T=200, segment_ids=lambda: segments([(70, 90, 30), (150,)], 200)),
    "head_dim_256_causal": dict(H=256, T=200, causal=True),
}
# bf16 on a representative subset, to keep the suite fast in interpret mode.
BF16_CASES = ("causal", "packed_3_segments_and_padding", "gqa_8_to_1", "soft_cap", "soft_cap_causal_window",
              "head_dim_96", "head_dim_256_causal")
# The TPU kernel's unstacked GQA path (G = 2, 4, 8), beside the default stacked one.
UNSTACKED = direct(tpu.flash_attention, block_sizes=tpu.BlockSizes(*(128,) * 6, stack_gqa=False), interpret=True)
UNSTACKED_CASES = [("gqa_8_to_1", "float32"), ("gqa_8_to_1_ragged_segments", "float32"),
                   ("gqa_4_to_1_window_segments_soft_cap", "float32"), ("packed_3_segments_and_padding", "float32"),
                   ("gqa_8_to_1", "bfloat16")]


def _problem(name, dtype, seed=0):
    c = dict(CASES[name])
    B, T, N, K, H = c.pop("B", 2), c.pop("T", 256), c.pop("N", 4), c.pop("K", 2), c.pop("H", 64)
    S = c.pop("S", T)
    if callable(c.get("segment_ids")):
        c["segment_ids"] = c["segment_ids"]()
    return inputs((B, T, N, H), (B, S, K, H), dtype, seed), c


def _padding(options):
    """(q rows, kv rows) with segment id 0, as bool [B, T] / [B, S]; None without ids."""
    ids = options.get("segment_ids")
    if ids is None:
        return None
    q_ids, kv_ids = ids if isinstance(ids, tuple) else (ids, ids)
    return np.asarray(q_ids) == 0, np.asarray(kv_ids) == 0


def test_cases_have_the_padding_they_test():
    assert _padding(dict(segment_ids=CASES["packed_3_segments_and_padding"]["segment_ids"]()))[0].sum() > 100
    assert _padding(dict(segment_ids=CASES["segments_all_padding_row"]["segment_ids"]()))[0][2].all()


@functools.cache
def _reference(name, dtype):
    """The oracle for a case, shared by every implementation: the float32 reference's value
    and grads on the same (possibly bf16-rounded) inputs."""
    (q, k, v, do), options = _problem(name, jnp.dtype(dtype))
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    return compiled(lambda *a: value_and_grads(lambda q, k, v: reference_attention(q, k, v, **options), *a),
                    *f32, do)


@pytest.mark.parametrize("name, dtype", [(n, "float32") for n in CASES] +
                         [(n, "bfloat16") for n in BF16_CASES])
@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
def test_matches_reference(implementation, name, dtype):
    _check(implementation, IMPLEMENTATIONS[implementation], name, dtype)


@pytest.mark.parametrize("name, dtype", UNSTACKED_CASES)
def test_unstacked_gqa_matches_reference(name, dtype):
    _check("pallas_unstacked", UNSTACKED, name, dtype)


def _check(implementation, fn, name, dtype):
    (q, k, v, do), options = _problem(name, jnp.dtype(dtype))
    got = compiled(lambda *a: value_and_grads(lambda q, k, v: fn(q, k, v, **options), *a), q, k, v, do)
    want = _reference(name, dtype)
    tol = TOL[dtype]
    # bf16 gradients are returned in bf16, whose 8 significant bits space values in
    # [8, 16) 2**-4 apart: rounding a gradient of ~9 alone moves it by up to 0.031,
    # over 2e-2 absolute (the XLA reference run in bf16 misses it by as much). So
    # the bf16 gradient bound grows with |ref| (np.allclose's atol = rtol = 2e-2);
    # the bf16 output (|out| <= max |v|) and everything float32 are absolute.
    grad_rtol = tol["grad"] if dtype == "bfloat16" else 0.0
    assert got[0].dtype == q.dtype and got[0].shape == q.shape
    for what, g, w, x, t, r in zip(("out", "dq", "dk", "dv"), got, want, (q, q, k, v),
                                   (tol["fwd"], tol["grad"], tol["grad"], tol["grad"]),
                                   (0.0, grad_rtol, grad_rtol, grad_rtol)):
        assert g.dtype == x.dtype, what
        check_close(g, w, t, f"{implementation}/{name}/{dtype} {what}", rtol=r)
    # Rows with nothing to attend to give exact zeros, and so do their gradients.
    out, dq, dk, dv = (np.asarray(x) for x in got)
    padding = _padding(options)
    if padding is not None:
        q_pad, kv_pad = padding
        assert np.all(out[q_pad] == 0) and np.all(dq[q_pad] == 0)
        assert np.all(dk[kv_pad] == 0) and np.all(dv[kv_pad] == 0)
    empty_rows = np.all(np.asarray(want[0]) == 0, axis=-1)  # [B, T, N]: the reference's empty rows
    assert np.all(out[empty_rows] == 0) and np.all(dq[empty_rows] == 0)


@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
def test_is_deterministic(implementation):
    (q, k, v, do), options = _problem("packed_3_segments_and_padding", jnp.bfloat16)
    fn = IMPLEMENTATIONS[implementation]
    run = jax.jit(lambda *a: value_and_grads(lambda q, k, v: fn(q, k, v, **options), *a))
    first, second = run(q, k, v, do), run(q, k, v, do)
    for a, b in zip(first, second):
        assert np.array_equal(np.asarray(a).view(np.uint16), np.asarray(b).view(np.uint16))
