"""The Pallas Triton-backend kernel (kernels/gpu_triton.py) beyond the conformance suite.

(a) interpret-mode checks on CPU: default tiles, and block skipping (masked blocks
    are never read); (b) CUDA lowering from this host (Triton custom calls in the
    StableHLO); (c) a real-GPU run, marked `gpu` (excluded by default).
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from kernels.gpu_triton import BlockSizes, cuda_lowering_device, flash_attention
from kernels.reference import reference_attention

from kernel_utils import SMALL_GPU_BLOCKS, check_close, compiled, direct, inputs, segments, value_and_grads

TRITON_CALL = "stablehlo.custom_call @__gpu$xla.gpu.triton"
_small_tiles = direct(flash_attention, block_sizes=SMALL_GPU_BLOCKS, interpret=True)


def _vjp(fn, q, k, v, do):
    out, pullback = jax.vjp(fn, q, k, v)
    return out, pullback(do.astype(out.dtype))


def test_default_block_sizes_ragged():
    # Default (H100) tiles: lengths below one tile and not a power of two.
    q, k, v, do = inputs((1, 200, 4, 64), (1, 200, 1, 64), jnp.float32)
    flash = direct(flash_attention, interpret=True)
    got = compiled(lambda *a: value_and_grads(lambda q, k, v: flash(q, k, v, causal=True), *a), q, k, v, do)
    want = value_and_grads(lambda q, k, v: reference_attention(q, k, v, causal=True), q, k, v, do)
    assert got[0].shape == q.shape and got[0].dtype == q.dtype
    for what, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        check_close(g, w, 1e-5 if what == "out" else 1e-4, what)


def test_causal_skips_blocks_above_diagonal():
    # NaN in V beyond the first kv tile: the first q tile is finite (and right)
    # only if those tiles are never visited, since 0 * NaN = NaN in p @ v.
    q, k, v, do = inputs((1, 64, 2, 64), (1, 64, 2, 64), jnp.float32)
    v_nan = v.at[:, 16:].set(jnp.nan)
    fn = lambda q, k, v: _small_tiles(q, k, v, causal=True)
    out, (dq, _, _) = _vjp(fn, q, k, v_nan, do.at[:, 16:].set(0.0))
    ref = reference_attention(q, k, v, causal=True)
    np.testing.assert_allclose(out[:, :16], ref[:, :16], atol=1e-5, rtol=1e-5)
    assert np.all(np.isfinite(np.asarray(dq[:, :16])))
    # dk/dv of the last kv tile only loop over the last q tile.
    q_nan = q.at[:, :48].set(jnp.nan)
    _, (_, dk, dv) = _vjp(fn, q_nan, k, v, do)
    assert np.all(np.isfinite(np.asarray(dk[:, 48:])))
    assert np.all(np.isfinite(np.asarray(dv[:, 48:])))


def test_sliding_window_skips_blocks_left_of_window():
    q, k, v, do = inputs((1, 64, 2, 64), (1, 64, 2, 64), jnp.float32)
    fn = lambda q, k, v: _small_tiles(q, k, v, sliding_window=16)
    out, (dq, _, _) = _vjp(fn, q, k, v.at[:, :16].set(jnp.nan), do)
    ref = reference_attention(q, k, v, sliding_window=16)
    np.testing.assert_allclose(out[:, 32:], ref[:, 32:], atol=1e-5, rtol=1e-5)
    assert np.all(np.isfinite(np.asarray(dq[:, 32:])))
    # Queries after position 31 never see the first kv tile.
    _, (_, dk, dv) = _vjp(fn, q.at[:, 32:].set(jnp.nan), k, v, do)
    assert np.all(np.isfinite(np.asarray(dk[:, :16])))
    assert np.all(np.isfinite(np.asarray(dv[:, :16])))


def test_bad_shapes_are_rejected():
    q, k, v, _ = inputs((1, 16, 3, 64), (1, 16, 2, 64), jnp.float32)
    with pytest.raises(ValueError, match="divide"):
        direct(flash_attention, interpret=True)(q, k, v)
    with pytest.raises(ValueError, match="power of two"):
        dataclasses.replace(BlockSizes.for_head_dim(64), block_q=24)


# ---------------------------------------------------------------------------
# (b) CUDA lowering from a CPU host.
# ---------------------------------------------------------------------------

def _lower_for_cuda(fn, *args):
    with cuda_lowering_device():
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def test_bias_is_rejected():
    q, k, v, _ = inputs((1, 16, 2, 64), (1, 16, 2, 64), jnp.float32)
    with pytest.raises(NotImplementedError, match="bias"):
        _lower_for_cuda(lambda q, k, v: kernels.attention(q, k, v, bias=jnp.zeros((1, 2, 16, 16)),
                                                          implementation="pallas"), q, k, v)


@pytest.mark.parametrize("head_dim", [64, 96, 128, 256])
def test_lowers_for_cuda(head_dim):
    q = jax.ShapeDtypeStruct((2, 300, 8, head_dim), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, 500, 2, head_dim), jnp.bfloat16)
    ids = (jax.ShapeDtypeStruct((2, 300), jnp.int32),
           jax.ShapeDtypeStruct((2, 500), jnp.int32))

    def fwd(q, k, v, ids):
        return direct(flash_attention)(q, k, v, causal=True, segment_ids=ids, sliding_window=128,
                                       logits_soft_cap=30.0)

    def loss(q, k, v, ids):
        return jnp.sum(fwd(q, k, v, ids).astype(jnp.float32))

    text = _lower_for_cuda(fwd, q, kv, kv, ids)
    assert text.count(TRITON_CALL) == 1
    # Interpret mode lowers the grid to a while loop; only CPU lowerings may have it.
    assert "stablehlo.while" not in text
    assert re.findall(r'name = "(flash_attention_gpu_\w+)"', text) == [
        "flash_attention_gpu_fwd"]
    # GQA reads the 2 kv heads in place (kv padded to 512): never repeated to 8.
    assert "x512x2x" in text and "x512x8x" not in text

    text = _lower_for_cuda(jax.grad(loss, argnums=(0, 1, 2)), q, kv, kv, ids)
    assert text.count(TRITON_CALL) == 3
    assert "stablehlo.while" not in text
    assert sorted(re.findall(r'name = "(flash_attention_gpu_\w+)"', text)) == [
        "flash_attention_gpu_dkv", "flash_attention_gpu_dq",
        "flash_attention_gpu_fwd"]
    assert "x512x8x" not in text


def test_lowers_for_cuda_mqa_f32():
    q = jax.ShapeDtypeStruct((1, 128, 8, 64), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, 256, 1, 64), jnp.float32)
    loss = lambda q, k, v: jnp.sum(direct(flash_attention)(q, k, v, causal=True))
    text = _lower_for_cuda(jax.grad(loss, argnums=(0, 1, 2)), q, kv, kv)
    assert text.count(TRITON_CALL) == 3


# ---------------------------------------------------------------------------
# (c) Real GPU run.
# ---------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_runs_on_gpu(dtype):
    if jax.devices()[0].platform != "gpu":
        pytest.skip("needs an NVIDIA GPU")
    b, t, n, kh, h = 2, 1000, 8, 2, 128
    q, k, v, do = inputs((b, t, n, h), (b, t, kh, h), dtype)
    seg = segments([[400, 500], [1000]], t)
    kw = dict(causal=True, segment_ids=seg, sliding_window=300,
              logits_soft_cap=30.0)
    flash = direct(flash_attention)
    out, grads = jax.jit(lambda q, k, v: _vjp(
        lambda q, k, v: flash(q, k, v, **kw), q, k, v, do))(q, k, v)
    f32 = lambda x: x.astype(jnp.float32)
    ref_out, ref_grads = _vjp(lambda q, k, v: reference_attention(q, k, v, **kw),
                              f32(q), f32(k), f32(v), do)
    # Loose for f32 too: the reference's XLA GPU matmuls may use TF32.
    tol = 2e-2 if dtype == jnp.bfloat16 else 2e-3
    np.testing.assert_allclose(f32(out), ref_out, atol=tol, rtol=tol)
    for g, ref_g in zip(grads, ref_grads):
        np.testing.assert_allclose(f32(g), ref_g, atol=5 * tol, rtol=5 * tol)
