"""Tests of the Pallas Triton-backend flash attention (kernels/flash_attention_gpu.py).

(a) interpret-mode correctness on CPU against the float32 reference, forward
    and dq/dk/dv; (b) CUDA lowering from this host (Triton custom calls in the
    StableHLO); (c) a real-GPU run, marked `gpu` (excluded by default).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.flash_attention_gpu import (BlockSizes, cuda_lowering_device,
                                         flash_attention_gpu)
from kernels.reference import reference_attention

# Small tiles so that short test sequences still span several blocks, which
# exercises the online softmax, block skipping and sequence padding.
SMALL = BlockSizes(block_q=16, block_k=16, block_q_dq=16, block_k_dq=16,
                   block_q_dkv=16, block_k_dkv=16)
# Bounds on |got - ref| against the float32 reference: atol, plus rtol * |ref|
# for bf16 gradients only, which are stored in bf16 (spacing 2**-4 at |x| ~ 9,
# so rounding alone can exceed 2e-2 absolute). Everything else is absolute.
TOL = {jnp.float32: dict(fwd=1e-5, grad=1e-4, grad_rtol=0.0),
       jnp.bfloat16: dict(fwd=2e-2, grad=2e-2, grad_rtol=2e-2)}
TRITON_CALL = "stablehlo.custom_call @__gpu$xla.gpu.triton"


def _inputs(shape_q, shape_kv, dtype, seed=0):
  kq, kk, kv, kd = jax.random.split(jax.random.PRNGKey(seed), 4)
  q = jax.random.normal(kq, shape_q, jnp.float32).astype(dtype)
  k = jax.random.normal(kk, shape_kv, jnp.float32).astype(dtype)
  v = jax.random.normal(kv, shape_kv, jnp.float32).astype(dtype)
  do = jax.random.normal(kd, shape_q, jnp.float32)
  return q, k, v, do


def _segments(lengths_per_row, total):
  """int32 [B, total]: ids 1, 2, ... for the given run lengths, then 0 padding."""
  rows = []
  for lengths in lengths_per_row:
    row = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)]
                         + [np.zeros(0)])
    rows.append(np.pad(row, (0, total - len(row))))
  return jnp.asarray(np.stack(rows), jnp.int32)


def _vjp(fn, q, k, v, do):
  out, pullback = jax.vjp(fn, q, k, v)
  return out, pullback(do.astype(out.dtype))


def _check(q, k, v, do, *, block_sizes=SMALL, **kw):
  """Kernel (interpret mode) vs the float32 reference, forward and grads."""
  tol = TOL[jnp.dtype(q.dtype).type]
  out, grads = _vjp(lambda q, k, v: flash_attention_gpu(
      q, k, v, block_sizes=block_sizes, interpret=True, **kw), q, k, v, do)
  f32 = lambda x: x.astype(jnp.float32)
  ref_out, ref_grads = _vjp(lambda q, k, v: reference_attention(q, k, v, **kw),
                            f32(q), f32(k), f32(v), do)
  assert out.shape == q.shape and out.dtype == q.dtype
  np.testing.assert_allclose(f32(out), ref_out, atol=tol["fwd"], rtol=0)
  for name, g, ref_g, x in zip("qkv", grads, ref_grads, (q, k, v)):
    assert g.dtype == x.dtype, name
    np.testing.assert_allclose(f32(g), ref_g, atol=tol["grad"], rtol=tol["grad_rtol"],
                               err_msg=f"d{name}")
  return out, grads


# (batch, q_len, kv_len, heads, kv_heads, head_dim), mask kwargs
CASES = {
    "plain": ((2, 64, 64, 2, 2, 64), {}),
    "causal": ((1, 64, 64, 2, 2, 64), dict(causal=True)),
    "gqa_8to1_causal": ((1, 48, 48, 8, 1, 64), dict(causal=True)),
    "gqa_4to2": ((1, 48, 48, 4, 2, 64), {}),
    "sliding_window": ((1, 96, 96, 2, 1, 64), dict(sliding_window=20)),
    "sliding_window_causal": ((1, 96, 96, 2, 2, 64),
                              dict(causal=True, sliding_window=33)),
    "soft_cap": ((1, 64, 64, 2, 1, 64), dict(logits_soft_cap=2.0, scale=0.5)),
    "soft_cap_causal_window": ((1, 50, 50, 4, 2, 64),
                               dict(logits_soft_cap=5.0, causal=True,
                                    sliding_window=17)),
    "q_shorter_causal": ((1, 24, 72, 4, 2, 64), dict(causal=True)),
    "q_longer_causal": ((1, 72, 40, 2, 1, 64), dict(causal=True)),
    "q_shorter_window": ((1, 20, 70, 2, 1, 64), dict(sliding_window=25)),
    "ragged_lengths": ((2, 37, 53, 2, 1, 64), {}),
    "ragged_causal": ((1, 50, 50, 2, 2, 64), dict(causal=True)),
    "head_dim_96": ((1, 40, 40, 4, 2, 96), dict(causal=True)),
    "head_dim_128": ((1, 40, 40, 2, 1, 128), {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference_f32(case):
  (b, t, s, n, kh, h), kw = CASES[case]
  _check(*_inputs((b, t, n, h), (b, s, kh, h), jnp.float32), **kw)


@pytest.mark.parametrize("case", ["causal", "gqa_8to1_causal", "head_dim_96",
                                  "soft_cap_causal_window"])
def test_matches_reference_bf16(case):
  (b, t, s, n, kh, h), kw = CASES[case]
  _check(*_inputs((b, t, n, h), (b, s, kh, h), jnp.bfloat16), **kw)


@pytest.mark.parametrize("causal", [False, True])
def test_segments_with_padding(causal):
  # Three and four segments, each row ending in padding; the last row is all
  # padding, so every one of its queries has nothing to attend to.
  t = 60
  seg = _segments([[10, 25, 15], [5, 17, 9, 20], []], t)
  q, k, v, do = _inputs((3, t, 4, 64), (3, t, 2, 64), jnp.float32)
  out, grads = _check(q, k, v, do, causal=causal, segment_ids=seg)
  pad = np.asarray(seg == 0)
  assert np.all(np.asarray(out)[pad] == 0.0)
  for g in grads:
    assert np.all(np.isfinite(np.asarray(g)))
  assert np.all(np.asarray(grads[0])[pad] == 0.0)


def test_segment_id_pair_cross_lengths():
  q_ids = _segments([[8, 12], [20]], 24)
  kv_ids = _segments([[30, 10], [15, 20]], 40)
  q, k, v, do = _inputs((2, 24, 2, 64), (2, 40, 1, 64), jnp.float32)
  _check(q, k, v, do, segment_ids=(q_ids, kv_ids))


def test_default_block_sizes_ragged():
  # Default (H100) tiles: lengths below one tile and not a power of two.
  q, k, v, do = _inputs((1, 200, 4, 64), (1, 200, 1, 64), jnp.float32)
  _check(q, k, v, do, causal=True, block_sizes=None)


def test_causal_skips_blocks_above_diagonal():
  # NaN in V beyond the first kv tile: the first q tile is finite (and right)
  # only if those tiles are never visited, since 0 * NaN = NaN in p @ v.
  q, k, v, do = _inputs((1, 64, 2, 64), (1, 64, 2, 64), jnp.float32)
  v_nan = v.at[:, 16:].set(jnp.nan)
  fn = lambda q, k, v: flash_attention_gpu(q, k, v, causal=True,
                                           block_sizes=SMALL, interpret=True)
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
  q, k, v, do = _inputs((1, 64, 2, 64), (1, 64, 2, 64), jnp.float32)
  fn = lambda q, k, v: flash_attention_gpu(q, k, v, sliding_window=16,
                                           block_sizes=SMALL, interpret=True)
  out, (dq, _, _) = _vjp(fn, q, k, v.at[:, :16].set(jnp.nan), do)
  ref = reference_attention(q, k, v, sliding_window=16)
  np.testing.assert_allclose(out[:, 32:], ref[:, 32:], atol=1e-5, rtol=1e-5)
  assert np.all(np.isfinite(np.asarray(dq[:, 32:])))
  # Queries after position 31 never see the first kv tile.
  _, (_, dk, dv) = _vjp(fn, q.at[:, 32:].set(jnp.nan), k, v, do)
  assert np.all(np.isfinite(np.asarray(dk[:, :16])))
  assert np.all(np.isfinite(np.asarray(dv[:, :16])))


def test_deterministic():
  q, k, v, do = _inputs((1, 48, 4, 64), (1, 48, 2, 64), jnp.bfloat16)
  fn = jax.jit(lambda q, k, v: _vjp(lambda q, k, v: flash_attention_gpu(
      q, k, v, causal=True, block_sizes=SMALL, interpret=True), q, k, v, do))
  first, second = fn(q, k, v), fn(q, k, v)
  for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)):
    np.testing.assert_array_equal(np.asarray(a, np.float32),
                                  np.asarray(b, np.float32))


def test_bias_is_rejected():
  q, k, v, _ = _inputs((1, 16, 2, 64), (1, 16, 2, 64), jnp.float32)
  with pytest.raises(NotImplementedError, match="bias"):
    flash_attention_gpu(q, k, v, bias=jnp.zeros((1, 2, 16, 16)), interpret=True)


def test_bad_shapes_are_rejected():
  q, k, v, _ = _inputs((1, 16, 3, 64), (1, 16, 2, 64), jnp.float32)
  with pytest.raises(ValueError, match="divide"):
    flash_attention_gpu(q, k, v, interpret=True)
  with pytest.raises(ValueError, match="power of two"):
    BlockSizes(block_q=24)


# ---------------------------------------------------------------------------
# (b) CUDA lowering from a CPU host.
# ---------------------------------------------------------------------------

def _lower_for_cuda(fn, *args):
  with cuda_lowering_device():
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("head_dim", [64, 96, 128, 256])
def test_lowers_for_cuda(head_dim):
  q = jax.ShapeDtypeStruct((2, 300, 8, head_dim), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((2, 500, 2, head_dim), jnp.bfloat16)
  ids = (jax.ShapeDtypeStruct((2, 300), jnp.int32),
         jax.ShapeDtypeStruct((2, 500), jnp.int32))

  def fwd(q, k, v, ids):
    return flash_attention_gpu(q, k, v, causal=True, segment_ids=ids,
                               sliding_window=128, logits_soft_cap=30.0)

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
  loss = lambda q, k, v: jnp.sum(flash_attention_gpu(q, k, v, causal=True))
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
  q, k, v, do = _inputs((b, t, n, h), (b, t, kh, h), dtype)
  seg = _segments([[400, 500], [1000]], t)
  kw = dict(causal=True, segment_ids=seg, sliding_window=300,
            logits_soft_cap=30.0)
  out, grads = jax.jit(lambda q, k, v: _vjp(
      lambda q, k, v: flash_attention_gpu(q, k, v, **kw), q, k, v, do))(q, k, v)
  f32 = lambda x: x.astype(jnp.float32)
  ref_out, ref_grads = _vjp(lambda q, k, v: reference_attention(q, k, v, **kw),
                            f32(q), f32(k), f32(v), do)
  # Loose for f32 too: the reference's XLA GPU matmuls may use TF32.
  tol = 2e-2 if dtype == jnp.bfloat16 else 2e-3
  np.testing.assert_allclose(f32(out), ref_out, atol=tol, rtol=tol)
  for g, ref_g in zip(grads, ref_grads):
    np.testing.assert_allclose(f32(g), ref_g, atol=5 * tol, rtol=5 * tol)
