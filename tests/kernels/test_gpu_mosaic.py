"""The Mosaic GPU kernel (kernels/gpu_mosaic*.py) without a GPU, and on one when there is.

(a) numerics under GPU interpret mode on CPU (jax >= 0.12: shared memory, warpgroups, barriers and
    TMA are simulated, with the race detector on and uninitialised memory read as NaN), forward,
    log-sum-exp and dq/dk/dv against the float32 reference; (b) lowering for sm90 from this host
    (the Mosaic GPU custom call, no interpret loop, K/V never repeated, head dims never padded);
    (c) which calls are refused; (d) a real-GPU run, marked `gpu`.
On jax < 0.12 this module imports and (a)/(b) are skipped. Cases are small: interpret mode costs
about a second per simulated CTA.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import base, gpu_mosaic, gpu_mosaic_fwd
from kernels.reference import reference_attention

from kernel_utils import check_close, compiled, direct, inputs, segments, value_and_grads

_JAX_BEFORE_0_12 = tuple(int(x) for x in re.findall(r"\d+", jax.__version__)[:2]) < (0, 12)
needs_interpret = pytest.mark.skipif(
    _JAX_BEFORE_0_12 or not gpu_mosaic.AVAILABLE,
    reason=f"needs jax >= 0.12 for Mosaic GPU interpret mode and lowering "
           f"(jax.experimental.pallas.mosaic_gpu.InterpretGPUParams); installed jax {jax.__version__}")
SMALL = gpu_mosaic.BlockSizes(*(64,) * 6)  # 64-key blocks: several pipeline steps at small lengths
# Bounds against the float32 reference on the same bf16 inputs, as the conformance suite's bf16:
# |got - ref| <= TOL * (1 + |ref|).
TOL = 2e-2
MOSAIC_CALL = "custom_call @mosaic_gpu"


def _interpret():
    return gpu_mosaic_fwd.InterpretGPUParams(detect_races=True)


# name -> (B, T, S, N, K, H, block sizes or None for the defaults, attention options)
CASES = {
    # q shorter than kv (causal aligns the last query with the last key), GQA 4:1, the window and the
    # soft cap; 3 kv steps through the 2-stage ring (the producer refills a slot).
    "causal_window_softcap_gqa4": (1, 70, 200, 4, 1, 64, SMALL,
                                   dict(causal=True, sliding_window=50, logits_soft_cap=5.0)),
    # packed segments; the second row is all padding (its rows attend to nothing: zeros, no NaN);
    # head_dim 96 (64-byte swizzle, not padded to 128), default tiles.
    "packed_empty_rows_h96": (2, 100, 100, 1, 1, 96, None,
                              dict(causal=True, segment_ids=lambda: segments([[40, 45], []], 100))),
    # q longer than kv: the first 50 rows see no key; head_dim 192 (one backward compute warpgroup);
    # blocks below the diagonal take the unmasked path.
    "q_longer_than_kv_h192": (1, 200, 150, 1, 1, 192, None, dict(causal=True)),
}
# More of the conformance suite's cases, excluded by default (-m slow) to keep interpret mode cheap.
SLOW_CASES = {
    "gqa8_causal": (1, 64, 64, 8, 1, 64, SMALL, dict(causal=True)),
    "head_dim_256_causal_window": (1, 150, 150, 1, 1, 256, None, dict(causal=True, sliding_window=70)),
    "plain_float16_h128": (1, 256, 256, 1, 1, 128, None, dict(dtype=jnp.float16)),
    "segment_pair_cross_lengths_h80": (
        2, 24, 140, 2, 1, 80, SMALL,
        dict(segment_ids=lambda: (segments([[8, 12], [20]], 24), segments([[100, 40], [15, 20]], 140)))),
    "soft_cap_scale_ragged": (1, 37, 203, 2, 2, 64, SMALL, dict(logits_soft_cap=1.0, scale=1.0, causal=True)),
}


def _problem(name, seed=0):
    B, T, S, N, K, H, blocks, kw = {**CASES, **SLOW_CASES}[name]
    kw = dict(kw)
    dtype = kw.pop("dtype", jnp.bfloat16)
    if callable(kw.get("segment_ids")):
        kw["segment_ids"] = kw["segment_ids"]()
    return inputs((B, T, N, H), (B, S, K, H), dtype, seed), blocks, kw


@needs_interpret
@pytest.mark.parametrize("name", [*CASES, *(pytest.param(n, marks=pytest.mark.slow) for n in SLOW_CASES)])
def test_matches_reference_in_interpret_mode(name):
    (q, k, v, do), blocks, kw = _problem(name)
    flash = direct(gpu_mosaic.flash_attention, block_sizes=blocks, interpret=_interpret())
    got = compiled(lambda *a: value_and_grads(lambda q, k, v: flash(q, k, v, **kw), *a), q, k, v, do)
    f32 = lambda x: x.astype(jnp.float32)
    want = value_and_grads(lambda q, k, v: reference_attention(q, k, v, **kw), f32(q), f32(k), f32(v), do)
    assert got[0].dtype == q.dtype and got[0].shape == q.shape
    for what, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert g.shape == w.shape, what
        check_close(g, w, TOL, what, rtol=TOL)


@needs_interpret
@pytest.mark.parametrize("name", ["packed_empty_rows_h96", "causal_window_softcap_gqa4"])
def test_sinks_in_interpret_mode(name):
    """Attention sinks (GPT-OSS) on the kernel's base-2 statistics: output and dq/dk/dv/dsinks
    against the reference (packed rows with an all-padding row: zeros stay zeros; GQA 4:1 with a
    distinct sink per query head, so a head mix-up shows)."""
    (q, k, v, do), blocks, kw = _problem(name)
    sinks = jnp.linspace(-1.0, 2.5, q.shape[2]).astype(jnp.float32)
    flash = direct(gpu_mosaic.flash_attention, block_sizes=blocks, interpret=_interpret())

    def value_and_grads_sinks(attend, q, k, v, s):
        loss = lambda q, k, v, s: jnp.sum(attend(q, k, v, sinks=s, **kw).astype(jnp.float32) * do)
        return (attend(q, k, v, sinks=s, **kw),) + jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, s)

    got = compiled(lambda *a: value_and_grads_sinks(flash, *a), q, k, v, sinks)
    f32 = lambda x: x.astype(jnp.float32)
    want = value_and_grads_sinks(reference_attention, f32(q), f32(k), f32(v), sinks)
    for what, g, w in zip(("out", "dq", "dk", "dv", "dsinks"), got, want):
        check_close(g, w, TOL, what, rtol=TOL)
    if name == "packed_empty_rows_h96":
        assert np.all(np.asarray(got[0][1]) == 0)  # the all-padding row


@needs_interpret
def test_log_sum_exp_and_empty_rows():
    # Not causal, a (q_ids, kv_ids) pair with padding on both sides, 6 kv blocks of 64 (the ring is
    # refilled 4 times), float16, head_dim 128.
    B, T, S, H = 1, 64, 300, 128
    q, k, v, _ = inputs((B, T, 1, H), (B, S, 1, H), jnp.float16, seed=1)
    q_ids = segments([[20, 30]], T)  # rows 50.. are padding
    kv_ids = segments([[150, 100]], S)
    q_ids_, kv_ids_, options = base.validate(q, k, v, segment_ids=(q_ids, kv_ids))
    out, lse = jax.jit(lambda q, k, v: gpu_mosaic.flash_attention_with_lse(
        q, k, v, q_ids_, kv_ids_, options, block_sizes=SMALL, interpret=_interpret()))(q, k, v)
    f32 = lambda x: x.astype(jnp.float32)
    want = reference_attention(f32(q), f32(k), f32(v), segment_ids=(q_ids, kv_ids))
    check_close(out, want, TOL, "out", rtol=TOL)
    logits = options.scale * jnp.einsum("bth,bsh->bts", f32(q)[:, :, 0], f32(k)[:, :, 0])
    keep = options.keep_mask(None, None, q_ids[:, :, None], kv_ids[:, None, :])
    want_lse = jax.nn.logsumexp(jnp.where(keep, logits, -jnp.inf), axis=-1)
    rows = np.asarray(q_ids[0] != 0)
    check_close(lse[0, 0, rows], want_lse[0, rows], 2e-2, "lse")
    assert np.all(np.asarray(out[0, ~rows]) == 0) and np.all(np.asarray(lse[0, 0, ~rows]) >= 1e29)


@pytest.mark.parametrize("T, S, kw", [
    (256, 256, dict(causal=True)), (100, 300, dict(causal=True, sliding_window=200)),
    (300, 170, dict(causal=True)), (200, 200, dict(sliding_window=150)), (128, 200, {})])
def test_unmasked_ranges_need_no_mask(T, S, kw):
    """The blocks the kernels run without a mask (only diagonal / window-edge / padding blocks pay
    for it) are exactly blocks that `base.tile_keep_mask` keeps whole; and some exist."""
    options = base.validate(jnp.zeros((1, T, 1, 64)), jnp.zeros((1, S, 1, 64)), jnp.zeros((1, S, 1, 64)), **kw)[2]
    cfg, _, _ = base.configure(options, (1, T, 1, 64), (1, S, 1, 64), has_segment_ids=False,
                               blocks=SMALL, interpret=True)
    cfg = dataclasses.replace(cfg, kv_padded=S % 128 != 0)
    rows = keys = 64
    found = 0
    for row0 in range(0, base.round_up(T, 128), rows):
        lo, hi = (int(x) for x in base.kv_block_range(cfg, row0 // rows, rows, keys))
        first, last = (int(x) for x in gpu_mosaic_fwd.unmasked_kv_steps(cfg, lo, max(hi - lo + 1, 0), row0, rows, keys))
        for j in range(lo + first, lo + last):
            found += 1
            assert bool(jnp.all(base.tile_keep_mask(cfg, row0, j * keys, rows, keys))), (row0, j)
    for key0 in range(0, base.round_up(S, 128), keys):
        lo, hi = (int(x) for x in base.q_block_range(cfg, key0 // keys, rows, keys))
        first, last = (int(x) for x in gpu_mosaic_fwd.unmasked_q_steps(cfg, lo, max(hi - lo + 1, 0), key0, keys, rows))
        for i in range(lo + first, lo + last):
            found += 1
            assert bool(jnp.all(base.tile_keep_mask(cfg, i * rows, key0, rows, keys))), (key0, i)
    assert found > 0


# ---------------------------------------------------------------------------
# (b) Lowering for sm90 from a host without a GPU.
# ---------------------------------------------------------------------------

@needs_interpret
@pytest.mark.parametrize("head_dim", [64, 96, 256])
def test_lowers_for_sm90_without_a_gpu(head_dim):
    """The whole Pallas -> Mosaic GPU lowering (layouts, wgmma operands, the shared-memory budget)
    runs on this host; with no GPU attached Mosaic GPU targets sm90. Compiling to SASS needs the
    CUDA plugin (see kernels/gpu_mosaic.py)."""
    q = jax.ShapeDtypeStruct((2, 300, 8, head_dim), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, 500, 2, head_dim), jnp.bfloat16)
    ids = (jax.ShapeDtypeStruct((2, 300), jnp.int32), jax.ShapeDtypeStruct((2, 500), jnp.int32))
    fwd = lambda q, k, v, ids: direct(gpu_mosaic.flash_attention)(
        q, k, v, causal=True, segment_ids=ids, sliding_window=128, logits_soft_cap=30.0)
    loss = lambda *a: jnp.sum(fwd(*a).astype(jnp.float32))
    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, kv, kv, ids).lower(
        lowering_platforms=("cuda",)).as_text()
    assert text.count(MOSAIC_CALL) == 3 and "triton" not in text
    assert "stablehlo.while" not in text  # no interpret mode
    # GQA reads the 2 kv heads in place (kv padded to 512): never repeated to 8; no head-dim padding.
    assert f"x512x2x{head_dim}xbf16" in text and "x512x8x" not in text
    assert f"x{head_dim}xbf16" in text and (head_dim != 96 or "x128xbf16" not in text)


# ---------------------------------------------------------------------------
# (c) Calls the kernel refuses.
# ---------------------------------------------------------------------------

def test_unserved_calls_raise():
    q = jnp.zeros((1, 64, 1, 64), jnp.bfloat16)
    flash = direct(gpu_mosaic.flash_attention, interpret=True)
    if not gpu_mosaic.AVAILABLE:
        with pytest.raises(NotImplementedError, match=r"jax >= 0\.12"):
            flash(q, q, q)
        return
    with pytest.raises(NotImplementedError, match="bfloat16 or float16"):
        flash(q.astype(jnp.float32), q.astype(jnp.float32), q.astype(jnp.float32))
    for head_dim in (32, 72, 320):
        x = jnp.zeros((1, 64, 1, head_dim), jnp.bfloat16)
        with pytest.raises(NotImplementedError, match="head_dim"):
            flash(x, x, x)
    with pytest.raises(ValueError, match="power of two"):
        gpu_mosaic.BlockSizes(32, 64, 64, 64, 64, 64)


def test_pre_hopper_device_is_refused(monkeypatch):
    monkeypatch.setattr(gpu_mosaic, "local_compute_capability", lambda: (8, 6))
    with pytest.raises(NotImplementedError, match="sm90.*sm86.*pallas_triton"):
        gpu_mosaic.check_device()
    monkeypatch.setattr(gpu_mosaic, "local_compute_capability", lambda: (9, 0))
    gpu_mosaic.check_device()


# ---------------------------------------------------------------------------
# (d) Real GPU run.
# ---------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_runs_on_gpu(head_dim):
    capability = gpu_mosaic.local_compute_capability()
    if capability is None or capability < (9, 0) or not gpu_mosaic.AVAILABLE:
        pytest.skip(f"the Mosaic GPU kernel serves Hopper+ (sm90) with jax >= 0.12; this machine has "
                    f"compute capability {capability}, jax {jax.__version__} (pallas_triton covers older GPUs)")
    b, t, n, kh = 2, 1000, 8, 2
    q, k, v, do = inputs((b, t, n, head_dim), (b, t, kh, head_dim), jnp.bfloat16)
    kw = dict(causal=True, segment_ids=segments([[400, 500], [1000]], t), sliding_window=300,
              logits_soft_cap=30.0)
    flash = direct(gpu_mosaic.flash_attention)
    got = jax.jit(lambda *a: value_and_grads(lambda q, k, v: flash(q, k, v, **kw), *a))(q, k, v, do)
    f32 = lambda x: x.astype(jnp.float32)
    with jax.default_matmul_precision("highest"):
        want = value_and_grads(lambda q, k, v: reference_attention(q, k, v, **kw), f32(q), f32(k), f32(v), do)
    for what, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        check_close(g, w, TOL if what == "out" else 5 * TOL, what, rtol=TOL)
