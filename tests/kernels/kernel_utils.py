"""Helpers shared by the kernel tests: inputs, segment ids, value-and-grads, closeness
checks, and calling a backend kernel the way `kernels.attention` does."""

import jax
import jax.numpy as jnp
import numpy as np

from kernels import base, gpu_triton

# GPU tiles of 16 rows, so that even short sequences span several blocks (online
# softmax, block skipping, sequence padding).
SMALL_GPU_BLOCKS = gpu_triton.BlockSizes(*(16,) * 6)
# Logical rules as zoo/sharding.py writes them (kernels/ never names mesh axes).
RULES = [("batch", ("data", "fsdp")), ("length", "context"), ("heads", "tensor"),
         ("kv_heads", "tensor"), ("head_dim", None)]


def segments(runs_per_row, total):
    """int32 [len(runs_per_row), total]: ids 1, 2, ... for each row's run lengths, then 0 padding."""
    ids = np.zeros((len(runs_per_row), total), np.int32)
    for b, runs in enumerate(runs_per_row):
        start = 0
        for i, n in enumerate(runs):
            ids[b, start:start + n] = i + 1
            start += n
    return jnp.asarray(ids)


def inputs(shape_q, shape_kv, dtype, seed=0):
    """q, k, v in `dtype` and a float32 output cotangent do."""
    kq, kk, kv, kd = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(kq, shape_q, jnp.float32).astype(dtype)
    k = jax.random.normal(kk, shape_kv, jnp.float32).astype(dtype)
    v = jax.random.normal(kv, shape_kv, jnp.float32).astype(dtype)
    do = jax.random.normal(kd, shape_q, jnp.float32)
    return q, k, v, do


def value_and_grads(fn, q, k, v, do):
    """(out, dq, dk, dv) of fn for the loss sum(out * do)."""
    loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * do)
    out = fn(q, k, v)
    return (out,) + jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


def check_close(got, want, tol, what, rtol=0.0):
    """Every |got - want| <= tol + rtol * |want|: an absolute bound when rtol is 0."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.all(np.isfinite(got)), f"{what}: non-finite values"
    err = np.abs(got - want)
    bound = tol + rtol * np.abs(want)
    worst = np.unravel_index(np.argmax(err / bound), err.shape)
    assert np.all(err <= bound), (
        f"{what}: |error| {err[worst]:.3g} > {tol} + {rtol} * |ref| ({bound[worst]:.3g}) "
        f"at {worst}; max abs error {err.max():.3g}")


def direct(kernel, **kernel_kwargs):
    """`kernel` (tpu.flash_attention, gpu_triton.flash_attention) behind `kernels.attention`'s
    signature: the one validation, then the kernel with `kernel_kwargs` (block sizes, interpret)."""
    def attention(q, k, v, sinks=None, **kwargs):
        q_ids, kv_ids, options = base.validate(q, k, v, **kwargs)
        extra = {} if sinks is None else {"sinks": base.validate_sinks(sinks, q.shape[2])}
        return kernel(q, k, v, q_ids, kv_ids, options, **kernel_kwargs, **extra)
    return attention


def compiled(fn, *args):
    """fn(*args), jitted with XLA's backend optimisations off: the interpret-mode kernels'
    loops compile in about half the time, and the tests only check values."""
    lowered = jax.jit(fn).trace(*args).lower()
    return lowered.compile({"xla_backend_optimization_level": 0})(*args)
