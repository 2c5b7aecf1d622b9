"""shard_map wrapping of the attention kernels over the mesh in context.

Pallas kernels cannot be partitioned by XLA: under a mesh they run per shard,
split over batch and heads as the Flax logical-axis rules in context say
("batch", "heads", "kv_heads"); sequence and head_dim stay whole. kernels/ never
names mesh axes itself.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import PartitionSpec


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


def sharded(kernel, q, k, v, q_ids, kv_ids, mesh=None, sinks=None):
    """Calls kernel(q, k, v, q_ids, kv_ids, sinks), per shard when a mesh and rules are active.

    mesh: the mesh to shard over; default the mesh in context
    (`jax.sharding.get_abstract_mesh()`), if any. sinks [N] (or None) split as the heads.
    """
    mesh = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return kernel(q, k, v, q_ids, kv_ids, sinks)
    # Sequence and head_dim stay whole inside the kernel, whatever the rules say.
    q_spec = nn.logical_to_mesh_axes(("batch", "length", "heads", "head_dim"))
    kv_spec = nn.logical_to_mesh_axes(("batch", "length", "kv_heads", "head_dim"))
    batch_axes = _mesh_axes(q_spec[0], mesh)
    head_axes = _mesh_axes(q_spec[2], mesh)
    kv_head_axes = _mesh_axes(kv_spec[2], mesh)
    if batch_axes is None and head_axes is None:
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
    qkv_spec = PartitionSpec(batch_axes, None, head_axes, None)
    ids_spec = PartitionSpec(batch_axes, None)
    # Only the arrays given travel through shard_map (None has no spec).
    given = [(x, spec) for x, spec in ((q_ids, ids_spec), (kv_ids, ids_spec), (sinks, PartitionSpec(head_axes)))
             if x is not None]

    def body(q, k, v, *rest):
        rest = iter(rest)
        ids = (next(rest), next(rest)) if q_ids is not None else (None, None)
        return kernel(q, k, v, *ids, next(rest) if sinks is not None else None)

    return jax.shard_map(body, mesh=mesh, in_specs=(qkv_spec,) * 3 + tuple(sp for _, sp in given),
                         out_specs=qkv_spec, check_vma=False)(q, k, v, *(x for x, _ in given))
