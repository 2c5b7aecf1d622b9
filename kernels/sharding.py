"""shard_map wrapping of the attention kernels over the mesh in context.

Pallas kernels cannot be partitioned by XLA: under a mesh they run per shard,
split over batch and heads as the Flax logical-axis rules in context say
("batch", "heads", "kv_heads"). The length stays whole inside the kernel, unless
the call asks for context parallelism and the rules shard "length": then each
shard holds its zig-zag rows and `kernels.context` runs attention across the
shards. head_dim stays whole. kernels/ never names mesh axes itself.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import PartitionSpec

from kernels import context


def _mesh_axes(entry, mesh):
    """Mesh axes of one PartitionSpec entry that exist in `mesh` and are not
    already manual (inside a caller's shard_map), or None."""
    names = (entry,) if isinstance(entry, str) else tuple(entry or ())
    manual = set(getattr(mesh, "manual_axes", ()))
    kept = tuple(n for n in names if n in mesh.axis_names and n not in manual)
    return kept or None


def _axis_size(axes, mesh):
    size = 1
    for name in axes or ():
        size *= mesh.shape[name]
    return size


def _in_context(mesh):
    mesh = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
    return None if mesh is None or mesh.empty else mesh


def context_axes(mesh=None):
    """The mesh axes that the logical rules in context shard "length" over, when they hold more
    than one device (context parallelism applies), else None."""
    mesh = _in_context(mesh)
    if mesh is None:
        return None
    axes = _mesh_axes(nn.logical_to_mesh_axes(("length",))[0], mesh)
    return axes if _axis_size(axes, mesh) > 1 else None


def sharded(kernel, q, k, v, q_ids, kv_ids, mesh=None, sinks=None, *, options=None, context_parallel=None,
            lse_kernel=None):
    """Calls kernel(q, k, v, q_ids, kv_ids, sinks), per shard when a mesh and rules are active.

    mesh: the mesh to shard over; default the mesh in context
    (`jax.sharding.get_abstract_mesh()`), if any. sinks [N] (or None) split as the heads.
    context_parallel: None, or "allgather" / "ring" with the call's `options` and `lse_kernel`
    (q, k, v, q_ids, kv_ids, options) -> (out, lse): when the rules shard "length", rows stay
    split by length and `kernels.context` attends across the shards.
    """
    mesh = _in_context(mesh)
    if mesh is None:
        return kernel(q, k, v, q_ids, kv_ids, sinks)
    ctx_axes = context_axes(mesh) if context_parallel is not None else None
    q_spec = nn.logical_to_mesh_axes(("batch", "length", "heads", "head_dim"))
    kv_spec = nn.logical_to_mesh_axes(("batch", "length", "kv_heads", "head_dim"))
    batch_axes = _mesh_axes(q_spec[0], mesh)
    head_axes = _mesh_axes(q_spec[2], mesh)
    kv_head_axes = _mesh_axes(kv_spec[2], mesh)
    if batch_axes is None and head_axes is None and ctx_axes is None:
        return kernel(q, k, v, q_ids, kv_ids, sinks)
    B, _, N, _ = q.shape
    K = k.shape[2]
    dp, tp = _axis_size(batch_axes, mesh), _axis_size(head_axes, mesh)
    if B % dp or N % tp:
        raise ValueError(f"attention under mesh {dict(mesh.shape)}: batch {B} must divide by "
                         f"{batch_axes} ({dp}) and heads {N} by {head_axes} ({tp})")
    if kv_head_axes != head_axes:
        raise ValueError(f"logical rules shard 'heads' over {head_axes} but 'kv_heads' over "
                         f"{kv_head_axes}; attention needs them on the same mesh axes")
    if K % tp:
        if tp % K:
            raise ValueError(f"{K} kv heads cannot be split over {head_axes} ({tp}) devices")
        # Each shard's query heads read one kv head: repeat kv heads up to tp
        # (a small copy) so every shard holds exactly the kv head it needs.
        k, v = (jnp.repeat(x, tp // K, axis=2) for x in (k, v))
    per_shard = kernel
    if ctx_axes is not None:
        plan = context.plan(context_parallel, ctx_axes, _axis_size(ctx_axes, mesh), options, q.shape[1], k.shape[1])
        per_shard = lambda *args: context.attend(plan, kernel, lse_kernel, *args)
    qkv_spec = PartitionSpec(batch_axes, ctx_axes, head_axes, None)
    ids_spec = PartitionSpec(batch_axes, ctx_axes)
    # Only the arrays given travel through shard_map (None has no spec).
    given = [(x, spec) for x, spec in ((q_ids, ids_spec), (kv_ids, ids_spec), (sinks, PartitionSpec(head_axes)))
             if x is not None]

    def body(q, k, v, *rest):
        rest = iter(rest)
        ids = (next(rest), next(rest)) if q_ids is not None else (None, None)
        return per_shard(q, k, v, *ids, next(rest) if sinks is not None else None)

    return jax.shard_map(body, mesh=mesh, in_specs=(qkv_spec,) * 3 + tuple(sp for _, sp in given),
                         out_specs=qkv_spec, check_vma=False)(q, k, v, *(x for x, _ in given))
