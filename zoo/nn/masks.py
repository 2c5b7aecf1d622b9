"""Positions, attention masks and segment ids of model inputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def default_positions(input_ids_BT: Array) -> Array:
    """0..T-1 for every row."""
    b, t = input_ids_BT.shape
    return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


def mask_to_segment_ids(attention_mask_BT: Array | None, segment_ids_BT: Array | None) -> Array | None:
    """HF attention_mask (1 keep, 0 pad) as segment ids (0 = padding); packing ids win."""
    if segment_ids_BT is not None:
        return segment_ids_BT.astype(jnp.int32)
    if attention_mask_BT is not None:
        return attention_mask_BT.astype(jnp.int32)
    return None


def chunked_segment_ids(segment_ids_BT: Array | None, batch: int, length: int, chunk: int) -> Array:
    """Segment ids that also split each segment into chunks of `chunk` tokens (Llama 4's chunked
    attention: a query sees only keys of its own chunk), for `kernels.attention`.

    A segment's chunks count from its first token: for an HF attention_mask (ids 0/1) that is
    the first real token (transformers counts from the leading padding, holes included); for
    packed documents (ids 1..n, below length + 1) each document's start, which is HF's rule
    for packed position ids (positions // chunk). Padding (id 0) stays 0.
    """
    ids_BT = jnp.ones((batch, length), jnp.int32) if segment_ids_BT is None else \
        jnp.minimum(segment_ids_BT.astype(jnp.int32), length)
    index_T = jnp.arange(length, dtype=jnp.int32)
    rows_B1 = jnp.arange(batch)[:, None]
    first_BI = jnp.full((batch, length + 1), length, jnp.int32).at[rows_B1, ids_BT].min(
        jnp.broadcast_to(index_T, (batch, length)))  # the first index of each id in its row
    chunk_BT = (index_T[None] - first_BI[rows_B1, ids_BT]) // chunk
    return jnp.where(ids_BT > 0, ids_BT + chunk_BT * (length + 1), 0)


def check_inputs(cfg, input_ids, **arrays) -> None:
    """Raises ValueError, before tracing further, for ids/masks of the wrong rank, shape or dtype."""
    if getattr(input_ids, "ndim", None) != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise ValueError(f"{cfg.name}: input_ids must be an integer [batch, length] array, got "
                         f"{getattr(input_ids, 'dtype', type(input_ids))}{getattr(input_ids, 'shape', '')}")
    for name, x in arrays.items():
        if x is None:
            continue
        if getattr(x, "shape", None) != input_ids.shape:
            raise ValueError(f"{cfg.name}: {name} must have the shape of input_ids {tuple(input_ids.shape)}, "
                             f"got {getattr(x, 'shape', type(x))}")


def encoder_segment_ids(attention_mask_BT, segment_ids_BT, batch: int, length: int):
    """(q_ids, kv_ids) for `kernels.attention`, or None when nothing is masked.

    Packed `segment_ids` keep attention inside each document (padding id 0 attends
    nowhere). An HF attention_mask only hides keys: every query gets id 1, so padded
    queries see the real tokens exactly as in PyTorch.
    """
    if segment_ids_BT is not None:
        ids_BT = segment_ids_BT.astype(jnp.int32)
        return ids_BT, ids_BT
    if attention_mask_BT is not None:
        return jnp.ones((batch, length), jnp.int32), (attention_mask_BT != 0).astype(jnp.int32)
    return None
