"""`kernels.attention` for every implementation that runs on CPU ("xla" and
"pallas" in interpret mode): one shared test body over masks, shapes and dtypes,
forward and dq/dk/dv against the float32 reference; plus empty rows, determinism,
sharding under a mesh, and which kernel each lowering platform gets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import Mesh

import kernels
from kernels import reference_attention
from kernels.flash_attention import BlockSizes, flash_attention

IMPLEMENTATIONS = ("xla", "pallas")
# Bounds on |got - ref| against the float32 reference: absolute, except bf16
# gradients, which are bounded by tol * (1 + |ref|) (see _check_close for why).
TOL = {"float32": dict(fwd=1e-5, grad=1e-4), "bfloat16": dict(fwd=2e-2, grad=2e-2)}
# Logical rules as zoo/sharding.py writes them (kernels/ never names mesh axes).
RULES = [("batch", ("data", "fsdp")), ("length", "sequence"), ("heads", "tensor"),
         ("kv_heads", "tensor"), ("head_dim", None)]


def _segments(B, L, runs):
  """int32 [B, L]: ids 1, 2, ... for the given run lengths, then 0 padding."""
  ids = np.zeros((B, L), np.int32)
  for b in range(B):
    start = 0
    for i, n in enumerate(runs[b]):
      ids[b, start:start + n] = i + 1
      start += n
  return jnp.asarray(ids)


# name -> shape and attention options. Default shape: B=2, T=S=256, N=4, K=2, H=64.
CASES = {
    "causal": dict(causal=True),
    "packed_3_segments_and_padding": dict(
        T=333, causal=True, segment_ids=lambda: _segments(2, 333, [(100, 150, 50), (20, 200)])),
    "packed_not_causal": dict(T=200, segment_ids=lambda: _segments(2, 200, [(64, 64, 64), (1, 130)])),
    "gqa_8_to_1": dict(N=8, K=1, causal=True),
    "gqa_4_to_2_noncausal": dict(T=200),
    "sliding_window": dict(T=384, causal=True, sliding_window=100),
    "soft_cap": dict(logits_soft_cap=1.0, scale=1.0, causal=True),
    "q_shorter_than_kv": dict(T=130, S=400, causal=True),
    "q_longer_than_kv": dict(T=300, S=140, causal=True),  # first 160 rows are empty
    "q_shorter_window_segments": dict(
        T=140, S=333, causal=True, sliding_window=129,
        segment_ids=lambda: (_segments(2, 333, [(100, 233), (333,)])[:, -140:],
                             _segments(2, 333, [(100, 233), (333,)]))),
    "head_dim_96": dict(H=96, causal=True),
    "head_dim_128": dict(H=128, T=512, N=2, K=1),
    "head_dim_192_segments": dict(
        H=192, T=200, segment_ids=lambda: _segments(2, 200, [(70, 90, 30), (150,)])),
    "head_dim_256_causal": dict(H=256, T=200, causal=True),
}
# bf16 on a representative subset, to keep the file fast in interpret mode.
BF16_CASES = ("causal", "packed_3_segments_and_padding", "gqa_8_to_1", "soft_cap", "head_dim_96",
              "head_dim_256_causal")


def _problem(name, dtype, seed=0):
  c = dict(CASES[name])
  B, T, N, K, H = 2, c.pop("T", 256), c.pop("N", 4), c.pop("K", 2), c.pop("H", 64)
  S = c.pop("S", T)
  if callable(c.get("segment_ids")):
    c["segment_ids"] = c["segment_ids"]()
  kq, kk, kv, kd = jax.random.split(jax.random.PRNGKey(seed), 4)
  q = jax.random.normal(kq, (B, T, N, H), jnp.float32).astype(dtype)
  k = jax.random.normal(kk, (B, S, K, H), jnp.float32).astype(dtype)
  v = jax.random.normal(kv, (B, S, K, H), jnp.float32).astype(dtype)
  do = jax.random.normal(kd, (B, T, N, H), jnp.float32)
  return (q, k, v, do), c


def _value_and_grads(fn, q, k, v, do):
  loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * do)
  out = fn(q, k, v)
  return (out,) + jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


def _check_close(got, want, tol, what, rtol=0.0):
  """Every |got - want| <= tol + rtol * |want|: an absolute bound when rtol is 0."""
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  assert np.all(np.isfinite(got)), f"{what}: non-finite values"
  err = np.abs(got - want)
  bound = tol + rtol * np.abs(want)
  worst = np.unravel_index(np.argmax(err / bound), err.shape)
  assert np.all(err <= bound), (
      f"{what}: |error| {err[worst]:.3g} > {tol} + {rtol} * |ref| ({bound[worst]:.3g}) "
      f"at {worst}; max abs error {err.max():.3g}")


@pytest.mark.parametrize("name, dtype", [(n, "float32") for n in CASES] +
                         [(n, "bfloat16") for n in BF16_CASES])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_matches_reference(implementation, name, dtype):
  (q, k, v, do), options = _problem(name, jnp.dtype(dtype))
  got = jax.jit(lambda *a: _value_and_grads(
      lambda q, k, v: kernels.attention(q, k, v, implementation=implementation, **options),
      *a))(q, k, v, do)
  # The oracle: float32 reference on the same (possibly bf16-rounded) inputs.
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  want = jax.jit(lambda *a: _value_and_grads(
      lambda q, k, v: reference_attention(q, k, v, **options), *a))(*f32, do)
  tol = TOL[dtype]
  # bf16 gradients are returned in bf16, whose 8 significant bits space values in
  # [8, 16) 2**-4 apart: rounding a gradient of ~9 alone moves it by up to 0.031,
  # over 2e-2 absolute (the XLA reference run in bf16 misses it by as much). So
  # the bf16 gradient bound grows with |ref| (np.allclose's atol = rtol = 2e-2);
  # the bf16 output (|out| <= max |v|) and everything float32 are absolute.
  grad_rtol = tol["grad"] if dtype == "bfloat16" else 0.0
  assert got[0].dtype == q.dtype
  for what, g, w, t, r in zip(("out", "dq", "dk", "dv"), got, want,
                              (tol["fwd"], tol["grad"], tol["grad"], tol["grad"]),
                              (0.0, grad_rtol, grad_rtol, grad_rtol)):
    _check_close(g, w, t, f"{implementation}/{name}/{dtype} {what}", rtol=r)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_empty_rows_give_zeros_and_finite_grads(implementation):
  (q, k, v, do), options = _problem("packed_3_segments_and_padding", jnp.float32)
  ids = options["segment_ids"]
  out, dq, dk, dv = jax.jit(lambda *a: _value_and_grads(
      lambda q, k, v: kernels.attention(q, k, v, implementation=implementation, **options),
      *a))(q, k, v, do)
  padded = np.asarray(ids) == 0
  assert padded.sum() > 100
  assert np.all(np.asarray(out)[padded] == 0)
  assert np.all(np.asarray(dq)[padded] == 0)
  assert np.all(np.asarray(dk)[padded] == 0) and np.all(np.asarray(dv)[padded] == 0)
  for g in (dq, dk, dv):
    assert np.all(np.isfinite(g))


def test_pallas_is_deterministic():
  (q, k, v, do), options = _problem("packed_3_segments_and_padding", jnp.bfloat16)
  run = jax.jit(lambda *a: _value_and_grads(
      lambda q, k, v: kernels.attention(q, k, v, implementation="pallas", **options), *a))
  first, second = run(q, k, v, do), run(q, k, v, do)
  for a, b in zip(first, second):
    assert np.array_equal(np.asarray(a).view(np.uint16), np.asarray(b).view(np.uint16))


def test_block_sizes_spanning_several_kv_blocks_per_q_block():
  # Unequal q/kv tiles (and different ones per kernel) exercise the block-range
  # arithmetic and the index-map clamping of skipped blocks.
  (q, k, v, do), options = _problem("q_shorter_window_segments", jnp.float32)
  blocks = BlockSizes(block_q=256, block_kv=128, block_q_dq=128, block_kv_dq=256,
                      block_q_dkv=128, block_kv_dkv=256)
  got = _value_and_grads(lambda q, k, v: flash_attention(
      q, k, v, block_sizes=blocks, interpret=True, **options), q, k, v, do)
  want = _value_and_grads(lambda q, k, v: reference_attention(q, k, v, **options), q, k, v, do)
  for what, g, w in zip(("out", "dq", "dk", "dv"), got, want):
    _check_close(g, w, 1e-5 if what == "out" else 1e-4, what)


@pytest.mark.parametrize("T, S, causal, window", [
    (300, 300, True, None), (300, 300, True, 40), (130, 700, True, 129),
    (700, 130, True, None), (700, 130, True, 3), (520, 520, False, None)])
@pytest.mark.parametrize("bq, bk", [(128, 128), (128, 512), (512, 128)])
def test_block_ranges_cover_the_mask_and_stay_in_bounds(T, S, causal, window, bq, bk):
  """The skipped (kv block, q block) pairs hold no kept entry, and clamped index
  maps never point outside the padded arrays (Mosaic would read out of bounds)."""
  from kernels.flash_attention import _Config, _clamp, _kv_block_range, _q_block_range
  from kernels.reference import attention_mask
  cfg = _Config(scale=1.0, causal=causal, sliding_window=window, logits_soft_cap=None,
                q_len=T, kv_len=S, groups=1, has_segment_ids=False, kv_padded=True,
                blocks=BlockSizes(), interpret=True)
  num_q, num_kv = -(-T // 512) * 512 // bq, -(-S // 512) * 512 // bk  # padded to 512
  mask = np.zeros((num_q * bq, num_kv * bk), bool)
  keep = attention_mask(T, S, causal=causal, sliding_window=window)
  mask[:T, :S] = True if keep is None else np.asarray(keep)[0]
  needed = mask.reshape(num_q, bq, num_kv, bk).any(axis=(1, 3))
  for qi in range(num_q):
    lo, hi = (int(x) for x in _kv_block_range(cfg, jnp.int32(qi), bq, bk))
    assert all(lo <= ki <= hi for ki in np.flatnonzero(needed[qi])), (qi, lo, hi)
    assert all(0 <= int(_clamp(jnp.int32(ki), lo, hi)) < num_kv for ki in range(num_kv))
  for ki in range(num_kv):
    lo, hi = (int(x) for x in _q_block_range(cfg, jnp.int32(ki), bq, bk))
    assert all(lo <= qi <= hi for qi in np.flatnonzero(needed[:, ki])), (ki, lo, hi)
    assert all(0 <= int(_clamp(jnp.int32(qi), lo, hi)) < num_q for qi in range(num_q))


def test_block_sizes_are_validated():
  with pytest.raises(ValueError, match="128"):
    BlockSizes(block_q=192)


@pytest.mark.parametrize("num_kv_heads", [4, 2])
def test_sharded_call_equals_unsharded(num_kv_heads):
  """Under a (data=2, tensor=4) mesh with the zoo's logical rules, the Pallas
  kernel runs per shard in shard_map and gives the unsharded result; with 2 kv
  heads over 4 tensor shards each shard gets its kv head by a repeat."""
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "tensor"))
  B, T, N, H = 4, 128, 8, 64
  kq, kk, kv, kd = jax.random.split(jax.random.PRNGKey(3), 4)
  q = jax.random.normal(kq, (B, T, N, H))
  k = jax.random.normal(kk, (B, T, num_kv_heads, H))
  v = jax.random.normal(kv, (B, T, num_kv_heads, H))
  do = jax.random.normal(kd, (B, T, N, H))
  ids = _segments(B, T, [(60, 68), (128,), (30, 30, 30), (100,)])
  fn = lambda q, k, v: kernels.attention(q, k, v, causal=True, segment_ids=ids,
                                         implementation="pallas")
  step = jax.jit(lambda *a: _value_and_grads(fn, *a))
  want = step(q, k, v, do)
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    assert "shard_map" in str(jax.make_jaxpr(fn)(q, k, v))
    got = step(q, k, v, do)
  for what, g, w in zip(("out", "dq", "dk", "dv"), got, want):
    np.testing.assert_allclose(g, w, atol=1e-6, rtol=0, err_msg=what)


def test_inside_a_callers_shard_map_runs_per_shard():
  """Mesh axes already manual (the caller's shard_map) are not split again."""
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "tensor"))
  q = jax.random.normal(jax.random.PRNGKey(0), (2, 128, 4, 64))
  spec = jax.sharding.PartitionSpec("data", None, "tensor", None)
  fn = lambda q: kernels.attention(q, q, q, causal=True, implementation="pallas")
  # check_vma=False: the CUDA branch (kernels/flash_attention_gpu.py) is traced
  # too and its outputs carry no manual-axis types.
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    got = jax.jit(jax.shard_map(fn, in_specs=spec, out_specs=spec, check_vma=False))(q)
  np.testing.assert_allclose(got, fn(q), atol=1e-6, rtol=0)
  # Our kernel itself also runs under check_vma=True, forward and backward.
  loss = lambda q: jnp.sum(flash_attention(q, q, q, causal=True, interpret=True) ** 2)
  sharded = jax.shard_map(jax.grad(loss), mesh=mesh, in_specs=spec, out_specs=spec)
  np.testing.assert_allclose(jax.jit(sharded)(q), jax.grad(loss)(q), atol=1e-4, rtol=1e-5)


def test_no_mesh_calls_kernel_directly():
  q = jnp.zeros((1, 128, 2, 64))
  assert "shard_map" not in str(jax.make_jaxpr(
      lambda q: kernels.attention(q, q, q, implementation="pallas"))(q))


# --- which kernel each lowering platform gets -------------------------------


def _lowered(fn, *args, platform):
  return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def test_cpu_lowering_uses_interpret_mode_or_reference():
  q = jnp.zeros((1, 256, 2, 64))
  pallas = _lowered(lambda q: kernels.attention(q, q, q, causal=True, implementation="pallas"),
                    q, platform="cpu")
  default = _lowered(lambda q: kernels.attention(q, q, q, causal=True), q, platform="cpu")
  # Interpret mode runs the grid as a loop; the reference has no loop.
  assert "stablehlo.while" in pallas and "custom_call" not in pallas
  assert "stablehlo.while" not in default and "custom_call" not in default


def test_cuda_lowering_uses_the_triton_kernel():
  from kernels.flash_attention_gpu import cuda_lowering_device
  q = jnp.zeros((1, 256, 2, 64), jnp.bfloat16)
  loss = lambda q: jnp.sum(kernels.attention(q, q, q, causal=True).astype(jnp.float32))
  with cuda_lowering_device():
    text = _lowered(jax.grad(loss), q, platform="cuda")
  assert "triton" in text and "tpu_custom_call" not in text
  # Interpret mode (a while loop over the grid, as in the CPU lowering above)
  # must not leak into the CUDA lowering.
  assert "stablehlo.while" not in text


def test_a_kernel_rejecting_the_call_fails_only_when_lowered():
  # head_dim 512 is beyond the GPU kernel; CPU (and TPU) still serve it.
  q = jax.random.normal(jax.random.PRNGKey(0), (1, 128, 1, 512))
  out = kernels.attention(q, q, q, causal=True, implementation="pallas")
  np.testing.assert_allclose(out, reference_attention(q, q, q, causal=True), atol=1e-5)
  from kernels.flash_attention_gpu import cuda_lowering_device
  with cuda_lowering_device(), pytest.raises(NotImplementedError, match="GPU kernel"):
    _lowered(lambda q: kernels.attention(q, q, q, implementation="pallas"), q, platform="cuda")


def test_cudnn_raises_when_lowered_off_gpu():
  q = jnp.zeros((1, 128, 2, 64), jnp.bfloat16)
  # Without cuDNN installed the CUDA branch cannot even be traced; with it, the
  # CPU lowering reaches the branch that refuses. Either way: a clear error.
  with pytest.raises(NotImplementedError, match="implementation='cudnn'"):
    _lowered(lambda q: kernels.attention(q, q, q, implementation="cudnn"), q, platform="cpu")
