"""`kernels.attention`'s dispatch: sharding under a mesh (kernels/sharding.py), and which
kernel each lowering platform gets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import Mesh

import kernels
from kernels import gpu_mosaic, reference_attention, tpu
from kernels.gpu_triton import cuda_lowering_device

from kernel_utils import RULES, direct, segments, value_and_grads


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
    ids = segments([(60, 68), (128,), (30, 30, 30), (100,)], T)
    fn = lambda q, k, v: kernels.attention(q, k, v, causal=True, segment_ids=ids,
                                           implementation="pallas")
    step = jax.jit(lambda *a: value_and_grads(fn, *a))
    want = step(q, k, v, do)
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        assert "shard_map" in str(jax.make_jaxpr(fn)(q, k, v))
        got = step(q, k, v, do)
    for what, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        np.testing.assert_allclose(g, w, atol=1e-6, rtol=0, err_msg=what)


def test_sharded_sinks_split_with_the_heads():
    """Sinks [N] travel through shard_map split like the query heads, forward and backward."""
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "tensor"))
    q = jax.random.normal(jax.random.PRNGKey(0), (2, 128, 8, 64))
    k = jax.random.normal(jax.random.PRNGKey(1), (2, 128, 2, 64))
    sinks = jnp.linspace(-2.0, 3.0, 8)
    fn = lambda q, k, s: kernels.attention(q, k, k, causal=True, sinks=s, implementation="pallas")
    loss = jax.jit(jax.value_and_grad(lambda q, k, s: jnp.sum(fn(q, k, s) ** 2), argnums=(0, 1, 2)))
    want = loss(q, k, sinks)
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        assert "shard_map" in str(jax.make_jaxpr(fn)(q, k, sinks))
        got = loss(q, k, sinks)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    for what, g, w in zip(("dq", "dk", "dsinks"), got[1], want[1]):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5, err_msg=what)


def test_inside_a_callers_shard_map_runs_per_shard():
    """Mesh axes already manual (the caller's shard_map) are not split again."""
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "tensor"))
    q = jax.random.normal(jax.random.PRNGKey(0), (2, 128, 4, 64))
    spec = jax.sharding.PartitionSpec("data", None, "tensor", None)
    fn = lambda q: kernels.attention(q, q, q, causal=True, implementation="pallas")
    # check_vma=False: the CUDA branch (kernels/gpu_triton.py) is traced
    # too and its outputs carry no manual-axis types.
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        got = jax.jit(jax.shard_map(fn, in_specs=spec, out_specs=spec, check_vma=False))(q)
    np.testing.assert_allclose(got, fn(q), atol=1e-6, rtol=0)
    # Our kernel itself also runs under check_vma=True, forward and backward.
    flash = direct(tpu.flash_attention, interpret=True)
    loss = lambda q: jnp.sum(flash(q, q, q, causal=True) ** 2)
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


def test_pallas_triton_lowers_the_triton_kernel_for_cuda():
    q = jnp.zeros((1, 256, 2, 64), jnp.bfloat16)
    loss = lambda q: jnp.sum(kernels.attention(q, q, q, causal=True, implementation="pallas_triton")
                             .astype(jnp.float32))
    with cuda_lowering_device():
        text = _lowered(jax.grad(loss), q, platform="cuda")
    assert "triton" in text and "mosaic_gpu" not in text and "tpu_custom_call" not in text
    # Interpret mode (a while loop over the grid, as in the CPU lowering above)
    # must not leak into the CUDA lowering.
    assert "stablehlo.while" not in text
    with pytest.raises(NotImplementedError, match="only lowers for CUDA"):
        _lowered(lambda q: kernels.attention(q, q, q, implementation="pallas_triton"), q, platform="tpu")


def test_pallas_triton_runs_in_interpret_mode_on_cpu():
    q = jax.random.normal(jax.random.PRNGKey(1), (1, 40, 2, 64))
    out = kernels.attention(q, q, q, causal=True, implementation="pallas_triton")
    np.testing.assert_allclose(out, reference_attention(q, q, q, causal=True), atol=1e-5, rtol=0)


@pytest.mark.parametrize("implementation, capability", [(None, (9, 0)), ("pallas", None), (None, (10, 0))])
def test_default_cuda_dispatch_never_reaches_triton(implementation, capability, monkeypatch):
    """On sm90+ (and when lowering from a host without a GPU, which Mosaic GPU lowers for sm90) the
    CUDA branch is the Mosaic GPU kernel; with jax < 0.12 it raises; never the Triton kernel."""
    monkeypatch.setattr(gpu_mosaic, "local_compute_capability", lambda: capability)
    q = jnp.zeros((1, 256, 2, 64), jnp.bfloat16)
    loss = lambda q: jnp.sum(kernels.attention(q, q, q, causal=True, implementation=implementation)
                             .astype(jnp.float32))
    with cuda_lowering_device():
        if not gpu_mosaic.AVAILABLE:
            with pytest.raises(NotImplementedError, match=r"Mosaic GPU kernel.*jax >= 0\.12"):
                _lowered(jax.grad(loss), q, platform="cuda")
            return
        text = _lowered(jax.grad(loss), q, platform="cuda")
    assert "triton" not in text and "tpu_custom_call" not in text
    assert text.count("custom_call @mosaic_gpu") == 3  # fwd, dq, dk/dv
    assert "stablehlo.while" not in text  # no interpret mode


def test_pre_hopper_cuda_raises_instead_of_falling_back(monkeypatch):
    monkeypatch.setattr(gpu_mosaic, "local_compute_capability", lambda: (8, 0))
    q = jnp.zeros((1, 256, 2, 64), jnp.bfloat16)
    with cuda_lowering_device(device_kind="NVIDIA A100"), pytest.raises(
            NotImplementedError, match="Mosaic GPU kernel" if not gpu_mosaic.AVAILABLE else "pallas_triton"):
        _lowered(lambda q: kernels.attention(q, q, q), q, platform="cuda")


def test_a_kernel_rejecting_the_call_fails_only_when_lowered():
    # head_dim 512 is beyond the GPU kernel; CPU (and TPU) still serve it.
    q = jax.random.normal(jax.random.PRNGKey(0), (1, 128, 1, 512))
    out = kernels.attention(q, q, q, causal=True, implementation="pallas")
    np.testing.assert_allclose(out, reference_attention(q, q, q, causal=True), atol=1e-5)
    with cuda_lowering_device(), pytest.raises(NotImplementedError, match="GPU kernel"):
        _lowered(lambda q: kernels.attention(q, q, q, implementation="pallas"), q, platform="cuda")


def test_cudnn_raises_when_lowered_off_gpu():
    q = jnp.zeros((1, 128, 2, 64), jnp.bfloat16)
    # Without cuDNN installed the CUDA branch cannot even be traced; with it, the
    # CPU lowering reaches the branch that refuses. Either way: a clear error.
    with pytest.raises(NotImplementedError, match="implementation='cudnn'"):
        _lowered(lambda q: kernels.attention(q, q, q, implementation="cudnn"), q, platform="cpu")
