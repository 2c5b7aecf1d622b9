"""The compacted grids of the TPU kernels (kernels/tpu.py): lists of the tiles with work.

Instead of a (q block, kv block) grid whose steps outside the causal/window band
are skipped one by one, the kernels walk a list of tiles, scalar-prefetched into
SMEM (`pltpu.PrefetchScalarGridSpec`). A tile is listed when the band reaches it
and, with segment ids, when its rows and keys may share a non-padding segment:
the per-block [min, max] id intervals of its rows and of its keys intersect and
neither block is all padding (id 0). So a packed batch of short documents visits
only the tiles of each document.

The lists are computed outside the kernel: from the static band in numpy (one
list for every batch row) or, with segment ids, with jnp on device (one list per
batch row, padded to the static bound). Each list entry carries its q block, its
kv block (and, for dk/dv, the query head within the group) and flags: VALID (the
tile is computed), FIRST / LAST (first and last entry of a run of the outer block,
where accumulators are initialised and outputs written). An outer block with no
tile still gets one entry (not VALID) so its outputs are written (zeros). Padding
entries at the end repeat the last entry, not VALID: they issue no DMA (same
block indices) and no compute; the static grid length is the band's tile count,
and only segment ids make the lists shorter than it.

Letter legend: B batch, G q heads per kv head.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from kernels import base, tpu_tuning

VALID, FIRST, LAST = 1, 2, 4


def band_work(cfg: base.Config, block_q: int, block_kv: int, num_q: int, num_kv: int):
    """bool [num_q, num_kv]: tiles inside the causal/window band (all without one)."""
    lo, hi = tpu_tuning.kv_block_range(cfg, np.arange(num_q), block_q, block_kv)
    ki = np.arange(num_kv)[None, :]
    return (ki >= lo[:, None]) & (ki <= hi[:, None])


def _segment_work(band, q_ranges, kv_ranges):
    """bool [B, num_q, num_kv]: band tiles whose rows and keys may share a segment."""
    (q_min, q_max), (kv_min, kv_max) = q_ranges, kv_ranges  # [B, n] each
    overlap = ((q_min[:, :, None] <= kv_max[:, None, :]) & (kv_min[:, None, :] <= q_max[:, :, None])
               & (q_max[:, :, None] > 0) & (kv_max[:, None, :] > 0))
    return jnp.asarray(band)[None] & overlap


def _compact(work, placeholder, size: int, xp):
    """Flat indices (ascending) of `work | placeholder` (disjoint) [L, n_outer, n_inner], padded
    to `size` by repeating the last, and whether each is `work` (VALID); per leading entry.

    Only cumulative sums, binary searches and reductions: no sort, scatter or gather, which
    XLA offloads to v5p/v6e SparseCores as async ops that jax cannot print (as_text)."""
    flat_work = work.reshape(work.shape[0], -1)
    flat_place = placeholder.reshape(placeholder.shape[0], -1)
    flat = flat_work | flat_place
    n = flat.shape[1]
    if xp is np:
        search = lambda a, v, side="left": np.stack([np.searchsorted(r, x, side=side) for r, x in zip(a, v)])
    else:
        search = lambda a, v, side="left": jax.vmap(
            lambda r, x: jnp.searchsorted(r, x, side=side, method="scan"))(a, v)
    targets = xp.broadcast_to(xp.arange(1, size + 1)[None, :], (flat.shape[0], size))
    # idx[s]: position of the s-th listed entry (the first position whose running count is s + 1).
    found = search(xp.cumsum(flat, axis=1), targets)
    count = flat.sum(axis=1, keepdims=True)
    last_listed = xp.max(xp.where(flat, xp.arange(n)[None, :], 0), axis=1, keepdims=True)
    listed = targets <= count
    idx = xp.where(listed, xp.minimum(found, n - 1), last_listed)
    # Placeholders up to and including each listed entry; an entry is VALID unless it is one.
    place_pos = search(xp.cumsum(flat_place, axis=1), targets)  # positions of placeholders (n: none)
    upto = search(place_pos, idx, side="right")
    before = xp.concatenate([xp.zeros_like(upto[:, :1]), upto[:, :-1]], axis=1)
    valid = listed & (upto == before)
    return idx, valid


def _flags(outer, valid, xp):
    """FIRST/LAST flags of runs of equal `outer` [B, size], and VALID."""
    new = xp.concatenate([xp.ones_like(outer[:, :1], dtype=bool), outer[:, 1:] != outer[:, :-1]], axis=1)
    end = xp.concatenate([outer[:, 1:] != outer[:, :-1], xp.ones_like(outer[:, :1], dtype=bool)], axis=1)
    return (valid * VALID + new * FIRST + end * LAST).astype(xp.int32)


def q_major_lists(cfg: base.Config, block_q: int, block_kv: int, num_q: int, num_kv: int, seg_ranges=None):
    """Tile lists of the forward and dq kernels (outer q block, inner kv block).

    Returns (q_block, kv_block, flags), int32 [L * steps] (L = 1 without segment ids,
    B with), and steps, the static list length.
    """
    band = band_work(cfg, block_q, block_kv, num_q, num_kv)
    steps = int(np.maximum(band.sum(axis=1), 1).sum())
    lo, _ = tpu_tuning.kv_block_range(cfg, np.arange(num_q), block_q, block_kv)
    first_kv = np.clip(lo, 0, num_kv - 1)
    if seg_ranges is None:
        work, xp = band[None], np
    else:
        work, xp = _segment_work(band, *seg_ranges), jnp
    empty = ~work.any(axis=2, keepdims=True)
    placeholder = empty & (xp.arange(num_kv)[None, None, :] == first_kv[None, :, None])
    idx, valid = _compact(work, placeholder, steps, xp)
    q_block, kv_block = idx // num_kv, idx % num_kv
    flags = _flags(q_block, valid, xp)
    return tuple(jnp.asarray(x.reshape(-1), jnp.int32) for x in (q_block, kv_block, flags)) + (steps,)


def kv_major_lists(cfg: base.Config, block_q: int, block_kv: int, num_q: int, num_kv: int, groups: int,
                   seg_ranges=None):
    """Tile lists of the dk/dv kernel (outer kv block, then query head g of the group,
    inner q block). Returns (kv_block, g, q_block, flags) int32 [L * steps] and steps."""
    band = band_work(cfg, block_q, block_kv, num_q, num_kv).T  # [num_kv, num_q]
    steps = groups * int(np.maximum(band.sum(axis=1), 1).sum())
    lo = np.argmax(band, axis=1)  # first q block of each kv block's band (0 if none)
    if seg_ranges is None:
        work, xp = band[None], np
    else:
        q_ranges, kv_ranges = seg_ranges
        work, xp = jnp.swapaxes(_segment_work(band.T, q_ranges, kv_ranges), 1, 2), jnp
    empty = ~work.any(axis=2, keepdims=True)
    placeholder = empty & (xp.arange(num_q)[None, None, :] == lo[None, :, None])
    # Repeat every kv block's row for each head of the group: [L, num_kv, G, num_q].
    expand = lambda x: xp.broadcast_to(x[:, :, None, :], (x.shape[0], num_kv, groups, num_q)).reshape(
        x.shape[0], num_kv * groups, num_q)
    idx, valid = _compact(expand(work), expand(placeholder), steps, xp)
    kv_block, g, q_block = idx // (groups * num_q), (idx // num_q) % groups, idx % num_q
    flags = _flags(kv_block, valid, xp)
    return tuple(jnp.asarray(x.reshape(-1), jnp.int32) for x in (kv_block, g, q_block, flags)) + (steps,)


def executed_steps(flags) -> int:
    """How many tiles a list makes the kernel compute (its VALID entries)."""
    return int((np.asarray(flags) & VALID).astype(bool).sum())


# ----------------------------------------------------------------------------
# In-kernel helpers: list lookups and the masked/unmasked split.


def block_ranges(ids_BL, block: int):
    """Per-block (smallest non-padding id, largest id), each [B, L // block], of ids [B, L]:
    the documents a block may hold (max 0: padding only). Not for `base.tile_needs_mask`,
    which needs the true minimum (padding must be masked)."""
    blocks = ids_BL.reshape(ids_BL.shape[0], -1, block)
    big = jnp.iinfo(jnp.int32).max
    return jnp.min(jnp.where(blocks > 0, blocks, big), axis=-1), jnp.max(blocks, axis=-1)


def visit(visited, needs_mask, step):
    """step(masked=True) on visited tiles that may hold a masked entry, step(masked=False)
    (no iota, compares or selects) on the others."""
    if needs_mask is False:
        pl.when(visited)(lambda: step(False))
        return
    pl.when(visited & needs_mask)(lambda: step(True))
    pl.when(visited & jnp.logical_not(needs_mask))(lambda: step(False))


def flag(flags, bit):
    return jax.lax.bitwise_and(flags, bit) != 0
