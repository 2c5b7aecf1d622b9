"""In-kernel helpers of the TPU flash-attention kernels (kernels/tpu.py): row/column
conversions of row statistics, the folded q scale, GQA head stacking (a [heads,
rows, H] block as one [heads * rows, H] operand, its row masks and per-head
columns) and the lookups of the scalar-prefetched tile lists and segment ranges.

Letter legend: H head dim.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels import base, tpu_grid
from kernels.base import Config

LANES = 128
SUBLANES = 8


def column(ref):
    """[rows, 1] from a [rows, 128] lane-broadcast ref."""
    return jnp.max(ref[...], axis=1, keepdims=True)


def diagonal(n):
    return (lax.broadcasted_iota(jnp.int32, (n, n), 0)
            == lax.broadcasted_iota(jnp.int32, (n, n), 1))


def row_to_column(row):
    """[1, n] -> [n, 1] without a vector transpose (select on the diagonal and reduce);
    used once per block, so its O(n^2) VPU work is small next to the matmuls."""
    n = row.shape[1]
    return jnp.sum(jnp.where(diagonal(n), row, jnp.zeros((), row.dtype)), axis=1, keepdims=True)


def column_to_row(col):
    """[n, 1] -> [1, n]; see `row_to_column`."""
    n = col.shape[0]
    return jnp.sum(jnp.where(diagonal(n), col, jnp.zeros((), col.dtype)), axis=0, keepdims=True)


def folds_scale(dtype) -> bool:
    """Whether scale * log2(e) is folded into q (rounded to q's dtype) rather than multiplied
    into the float32 logits: for float32 q only. Rounding a scaled bf16 q adds an error of
    2**-9 of every logit, which the bf16 bounds of the conformance suite do not absorb."""
    return jnp.dtype(dtype) == jnp.float32


def flat(ref):
    """A [heads, rows, H] block as one [heads * rows, H] operand (heads stacked on the rows)."""
    x = ref[...]
    return x.reshape(x.shape[0] * x.shape[1], x.shape[2])


def scaled_q(q_ref, q_scaled):
    """The q operand of the base-2 logits: the folded copy (`scale_q`) or q itself."""
    return q_scaled[...] if folds_scale(q_ref.dtype) else flat(q_ref)


def scale_q(cfg: Config, q_scaled, q_ref):
    """q_scaled = q * scale * log2(e), once per q block, when the scale is folded into q."""
    if folds_scale(q_ref.dtype):
        q_scaled[...] = (flat(q_ref).astype(jnp.float32) * base.q_scale2(cfg)).astype(q_scaled.dtype)


def heads_per_step(cfg: Config) -> int:
    """Query heads per forward / dq grid step: G stacked, else 1."""
    return cfg.blocks.heads_per_step(cfg.groups)


def keep_mask(cfg: Config, q_start, key_start, block_q: int, block_kv: int, q_ids=None, kv_ids=None):
    """`base.tile_keep_mask` of the [heads * block_q, block_kv] tile of stacked heads: row r
    is query position q_start + r % block_q; q_ids (a column) already spans every row."""
    heads = heads_per_step(cfg)
    if heads == 1:
        return base.tile_keep_mask(cfg, q_start, key_start, block_q, block_kv, q_ids, kv_ids)
    q_pos = key_pos = None
    if cfg.banded or (cfg.kv_padded and not cfg.has_segment_ids):
        shape = (heads * block_q, block_kv)
        row = lax.bitwise_and(lax.broadcasted_iota(jnp.int32, shape, 0), block_q - 1)  # block_q: 2**k
        q_pos = q_start + cfg.q_offset + row
        key_pos = key_start + lax.broadcasted_iota(jnp.int32, shape, 1)
    return cfg.keep_mask(q_pos, key_pos, q_ids, kv_ids)


def fill_heads(ref, col):
    """Each head's [rows, 128] slice of a stacked [heads * rows, 128] ref from one [rows, 1] column."""
    n = col.shape[0]
    for h in range(ref.shape[0] // n):
        ref[pl.ds(h * n, n), :] = jnp.broadcast_to(col, (n, ref.shape[1]))


def columns_from_rows(col_ref, row_ref):
    """col_ref [heads * rows, 128] (lane-broadcast columns) from row_ref [heads, 8, rows]."""
    n = row_ref.shape[2]
    for h in range(row_ref.shape[0]):
        col_ref[pl.ds(h * n, n), :] = jnp.broadcast_to(row_to_column(row_ref[h, :1, :]), (n, col_ref.shape[1]))


def q_scratch(bq, H, dtype):
    """VMEM for the folded q (a dummy 8x128 tile when the scale is not folded)."""
    return pltpu.VMEM((bq, H) if folds_scale(dtype) else (SUBLANES, LANES), dtype)


def zero(*refs):
    for ref in refs:
        ref[...] = jnp.zeros(ref.shape, ref.dtype)


def fill_lanes(ref, col):
    ref[...] = jnp.broadcast_to(col, ref.shape)


def prefetched(cfg: Config, refs, n_lists: int):
    """(the tile lists, the 4 segment-range refs or None, the other refs) of a kernel's refs."""
    lists, refs = refs[:n_lists], refs[n_lists:]
    return (lists, refs[:4], refs[4:]) if cfg.has_segment_ids else (lists, None, refs)


def entry(cfg: Config, steps: int, b, s):
    """List index of grid step s of batch row b: lists are per row only with segment ids."""
    return b * steps + s if cfg.has_segment_ids else s


def tile_ranges(ranges, qi, num_q: int, kj, num_kv: int):
    """(q_min, q_max, kv_min, kv_max) segment ids of tile (qi, kj) of batch row
    program_id(0), read from the SMEM block ranges; None without segment ids."""
    if ranges is None:
        return None
    b = pl.program_id(0)
    q_min, q_max, kv_min, kv_max = ranges
    return (q_min[b * num_q + qi], q_max[b * num_q + qi], kv_min[b * num_kv + kj], kv_max[b * num_kv + kj])


def segment_ranges(ids, block_q: int, block_kv: int):
    """Scalar-prefetch operands for the mask split: per-block (min, max) q and kv ids, or ()."""
    if not ids:
        return ()
    return (*base.block_id_ranges(ids[0][:, 0, :], block_q), *base.block_id_ranges(ids[1][:, 0, :], block_kv))


def list_ranges(ids, block_q: int, block_kv: int):
    """Per-block document ranges of q and kv ids for the tile lists, or None."""
    if not ids:
        return None
    return tpu_grid.block_ranges(ids[0][:, 0, :], block_q), tpu_grid.block_ranges(ids[1][:, 0, :], block_kv)
