"""Context parallelism (kernels/context.py): attention over rows whose length is sharded equals
the unsharded call on the natural rows, forward and backward, for both variants."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import Mesh

import kernels
from kernels import context

from kernel_utils import check_close, segments

# The zoo's rules with the length sharded over `context` (kernels/ never names mesh axes).
CONTEXT_RULES = [("batch", ("data", "fsdp")), ("length", "context"), ("heads", "tensor"),
                 ("kv_heads", "tensor"), ("head_dim", None)]
L = 64


def _mesh(shape):
    names = tuple(shape)
    devices = np.array(jax.devices()[:int(np.prod(list(shape.values())))]).reshape(tuple(shape.values()))
    return Mesh(devices, names)


@pytest.mark.parametrize("shards", [1, 2, 4])
def test_zigzag_order(shards):
    order = context.zigzag_order(L, shards)
    assert sorted(order.tolist()) == list(range(L))
    C = L // (2 * shards)
    for r in range(shards):
        rows = order[2 * C * r: 2 * C * (r + 1)]
        assert rows.tolist() == list(range(r * C, (r + 1) * C)) + list(range((2 * shards - 1 - r) * C,
                                                                             (2 * shards - r) * C))
    # An all-gather of the zig-zag rows, put back in natural chunk order, is the natural row.
    x = np.arange(L)[None, :, None]
    np.testing.assert_array_equal(context._natural_chunks(jnp.asarray(x[:, order]), shards), x)
    with pytest.raises(ValueError, match="divide by 2 x"):
        context.zigzag_order(L + 1, shards)


# (name, kwargs of kernels.attention, variants) ; W - 1 <= C takes the halo, W = 20 > C + 1 (C = 8)
# takes all-gather's static window slices (ring refuses it).
CASES = [
    ("causal", dict(causal=True), ("allgather", "ring")),
    ("causal-packed", dict(causal=True, ids=True), ("allgather", "ring")),
    ("window-halo", dict(causal=True, sliding_window=5, ids=True), ("allgather", "ring")),
    ("window-long", dict(causal=True, sliding_window=20), ("allgather",)),
    ("bidirectional-packed", dict(causal=False, ids=True), ("allgather", "ring")),
    ("sinks-softcap", dict(causal=True, sinks=True, logits_soft_cap=2.0), ("allgather", "ring")),
]
MESHES = {"context=4": {"context": 4}, "data=2,context=2,tensor=2": {"data": 2, "context": 2, "tensor": 2}}
# The Pallas kernel (interpret mode) in the packed and windowed cases on context=4, on CI's newest-JAX leg (their
# compiles are long); the reference ("xla") in every case, on both legs.
PARAMS = [pytest.param(kind, mesh, name, kw, impl, id=f"{impl}-{kind}-{mesh}-{name}",
                       marks=[pytest.mark.newest_jax_leg] if impl == "pallas" else [])
          for name, kw, kinds in CASES for kind in kinds for mesh in MESHES
          for impl in (("pallas", "xla") if name in ("causal-packed", "window-halo") and mesh == "context=4"
                       else ("xla",))]


@pytest.mark.parametrize("kind,mesh_name,name,kw,impl", PARAMS)
def test_context_attention_equals_one_device(kind, mesh_name, name, kw, impl):
    """Zig-zag rows under the mesh, put back in natural order, equal the unsharded call on the natural rows:
    out, dq, dk, dv (and dsinks) to 1e-5 in float32. Packed documents cross chunk and shard edges."""
    mesh = _mesh(MESHES[mesh_name])
    shards = mesh.shape["context"]
    B, N, K, H = 2, 4, 2, 32
    keys = jax.random.split(jax.random.PRNGKey(7), 5)
    q = jax.random.normal(keys[0], (B, L, N, H))
    k = jax.random.normal(keys[1], (B, L, K, H))
    v = jax.random.normal(keys[2], (B, L, K, H))
    do = jax.random.normal(keys[3], (B, L, N, H))
    sinks = jax.random.normal(keys[4], (N,)) if kw.get("sinks") else None
    ids = segments([(27, 23, 10), (5, 40, 19)], L) if kw.get("ids") else None
    opts = {key: val for key, val in kw.items() if key not in ("ids", "sinks")}
    order = context.zigzag_order(L, shards)
    inverse = np.argsort(order)

    def loss(q, k, v, s, ids, do, **extra):
        out = kernels.attention(q, k, v, segment_ids=ids, sinks=s, implementation=impl, **opts, **extra)
        return jnp.sum(out * do), out

    grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True), static_argnames=("context_parallel",))
    (_, want_out), want = grads(q, k, v, sinks, ids, do)
    zig = lambda x: None if x is None else x[:, order]
    with jax.set_mesh(mesh), nn.logical_axis_rules(CONTEXT_RULES):
        (_, got_out), got = grads(zig(q), zig(k), zig(v), sinks, zig(ids), zig(do), context_parallel=kind)
    check_close(got_out[:, inverse], want_out, 1e-5, "out")
    for what, g, w in zip(("dq", "dk", "dv"), got[:3], want[:3]):
        check_close(g[:, inverse], w, 1e-5, what)
    if sinks is not None:
        check_close(got[3], want[3], 1e-5, "dsinks")


def test_context_collectives():
    """All-gather gathers k and v and sends no blocks around; ring passes blocks and gathers nothing;
    the halo sends only W - 1 rows to each neighbour."""
    mesh = _mesh({"context": 4})
    q = jnp.ones((2, L, 4, 32))
    k = jnp.ones((2, L, 2, 32))

    def hlo(kind, **kw):
        fn = lambda q, k: jnp.sum(kernels.attention(q, k, k, causal=True, implementation="xla",
                                                    context_parallel=kind, **kw))
        with jax.set_mesh(mesh), nn.logical_axis_rules(CONTEXT_RULES):
            return jax.jit(jax.grad(fn, argnums=(0, 1))).lower(q, k).as_text()

    gather, ring, halo = hlo("allgather"), hlo("ring"), hlo("ring", sliding_window=3)
    assert "all_gather" in gather and "collective_permute" not in gather
    assert "collective_permute" in ring and "all_gather" not in ring
    assert "all_gather" not in halo and "collective_permute" in halo
    # the halo's permutes carry 2 rows (W - 1) of the 16 local rows
    assert "tensor<2x2x2x32xf32>" in halo


def test_context_refusals():
    mesh = _mesh({"context": 4})
    q = jnp.ones((1, L, 2, 32))
    with jax.set_mesh(mesh), nn.logical_axis_rules(CONTEXT_RULES):
        with pytest.raises(ValueError, match="sliding_window - 1"):
            kernels.attention(q, q, q, causal=True, sliding_window=20, context_parallel="ring", implementation="xla")
        with pytest.raises(ValueError, match="divide by 2 x 4"):
            kernels.attention(q[:, :60], q[:, :60], q[:, :60], causal=True, context_parallel="ring",
                              implementation="xla")
        with pytest.raises(ValueError, match="q_len == kv_len"):
            kernels.attention(q[:, :32], q, q, causal=True, context_parallel="allgather", implementation="xla")
        with pytest.raises(NotImplementedError, match="bias"):
            kernels.attention(q, q, q, bias=jnp.zeros((1, 1, L, L)), context_parallel="allgather")
        with pytest.raises(ValueError, match="unknown context_parallel"):
            kernels.attention(q, q, q, context_parallel="ulysses")
