"""Flash attention as Pallas kernels for TPU (Mosaic), also run in interpret mode on CPU.

Forward: online softmax over kv blocks with float32 VMEM accumulators (m, l, acc),
saving the logsumexp per query row; each kv tile (one DMA) is computed in
sub-blocks of `block_kv_compute` keys. Logits are base 2: scale * log2(e) is
folded into q once per q block (float32 inputs; for bf16 it multiplies the
float32 logits, see `tiles.folds_scale`), exp2 replaces exp, and the saved
logsumexp is base 2 (`flash_attention_with_lse` returns it in natural units; rows with
nothing to attend to get `base.MASK_VALUE`). Backward: one kernel for dq (loop over
kv blocks) and one for dk/dv (loop over the G query heads of a kv head and over q
blocks), under `jax.custom_vjp`. GQA head stacking (`BlockSizes.stack_gqa`): a
forward or dq grid step takes the G query heads of one kv head as a [G, block_q, H]
block, flattened to one [G * block_q, H] operand (row r is query position
q_start + r % block_q of head r // block_q), so K/V tiles are fetched once per
group and every matmul is G times taller; unstacked, a step takes one head.
Semantics are those of `kernels.reference_attention`; inputs arrive validated
(`kernels.base.validate`).

Layout: the wrapper transposes to [B, N, T, H] so every block's last two dims
are (rows, head_dim), pads T and S to the block multiple (padded keys are
masked by an explicit length or by segment id 0) and head_dim 96/192/... to a
multiple of 128 (zeros change no dot product). Row statistics (lse, delta) and
segment ids live in HBM as sublane-broadcast [..., 8, L] arrays, 32 bytes per
row; kernels that need them as columns convert once per block into VMEM
scratch. The grid is compacted: each kernel walks a list of the tiles with work
(`kernels.tpu_grid`: the causal/window band and, with segment ids, only tiles
whose rows and keys may share a document), scalar-prefetched into SMEM; its index
maps read the list, so nothing outside it is fetched or computed. Of the visited
tiles only those crossing the causal diagonal, a window edge, the kv padding or a
segment boundary evaluate the mask (iota, compares, selects):
`base.tile_needs_mask` decides from the tile's coordinates and its per-block
min/max segment ids, also scalar-prefetched. Block sizes and the VMEM limit come
from `kernels.tpu_tuning` (per TPU generation and head dim), which also writes
each call's `pl.CostEstimate`; the in-kernel helpers live in `kernels.tpu_tiles`.
The dk/dv kernel works on transposed [kv, q] tiles so its matmuls need no
transposes. Nothing of size [T, S] is ever materialised.

Letter legend: B batch, T q length, S kv length, N q heads, K kv heads,
G = N // K q heads per kv head, H head dim.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels import base, tpu_grid, tpu_tuning
from kernels import tpu_tiles as tiles
from kernels.base import Config
from kernels.tpu_tuning import BlockSizes

_LANES = 128
_SUBLANES = 8
_SQUEEZED = pl.Squeezed()
_LN_2 = math.log(2.0)


def flash_attention(q, k, v, q_ids, kv_ids, options: base.Options, *,
                    block_sizes: BlockSizes | None = None, interpret: bool = False, sinks=None):
    """Fused attention, differentiable in q, k, v (and sinks); semantics of `reference_attention`.

    Args:
      q: [B, T, N, H]; k, v: [B, S, K, H] with K dividing N (query head n reads
        kv head n // (N // K); K/V are never repeated).
      q_ids, kv_ids, options: as `kernels.base.validate` returns them.
      block_sizes: `BlockSizes`; default the table row (`kernels.tpu_tuning`) of
        the TPU generation being lowered for and the head dim, with its VMEM
        limit, for Mosaic; 128-row tiles in interpret mode.
      interpret: run in Pallas interpret mode (CPU) instead of compiling with Mosaic.
      sinks: float [N] or None: per-head sink logits, applied to the kernel's output and
        row statistics (`kernels.base.apply_sinks`).

    Returns:
      [B, T, N, H] in q's dtype; rows with nothing to attend to are zeros.
    """
    cfg, costs, operands, ids = _prepare(q, k, v, q_ids, kv_ids, options, block_sizes, interpret)
    out_BNTH = _flash(cfg, costs, *operands, sinks, *ids)
    return jnp.swapaxes(out_BNTH[:, :, :q.shape[1], :q.shape[3]], 1, 2)


def flash_attention_with_lse(q, k, v, q_ids, kv_ids, options: base.Options, *,
                             block_sizes: BlockSizes | None = None, interpret: bool = False):
    """`flash_attention` (no sinks) that also returns each row's natural log-sum-exp.

    Args: as `flash_attention`.

    Returns:
      (out [B, T, N, H] in q's dtype, lse [B, T, N] float32): lse is the natural log-sum-exp
      of the row's kept, scaled (soft-capped) logits. A row with nothing to attend to gives
      out 0 and lse `base.MASK_VALUE`. Differentiable in q, k, v through both outputs, so
      that calls on disjoint key blocks can be merged by their lse (ring attention).
    """
    cfg, costs, operands, ids = _prepare(q, k, v, q_ids, kv_ids, options, block_sizes, interpret)
    out_BNTH, lse_BNT = _flash_lse(cfg, costs, *operands, *ids)
    T, H = q.shape[1], q.shape[3]
    return jnp.swapaxes(out_BNTH[:, :, :T, :H], 1, 2), jnp.swapaxes(lse_BNT[:, :, :T], 1, 2)


def _prepare(q, k, v, q_ids, kv_ids, options: base.Options, block_sizes, interpret):
    """The kernel call of [B, L, X, H] inputs: (cfg, costs, (q, k, v) as padded [B, X, L, H_pad]
    blocks, ids as sublane-broadcast [B, 8, L_pad] pairs or ())."""
    B, T, _, H = q.shape
    G = q.shape[2] // k.shape[2]
    blocks = block_sizes or BlockSizes.for_platform(
        "cpu" if interpret else "tpu", None if interpret else tpu_tuning.device_generation(), H, q.dtype, G)
    blocks = blocks.resolved(G, H, q.dtype, interpret)
    cfg, T_pad, S_pad = base.configure(options, q.shape, k.shape, has_segment_ids=q_ids is not None,
                                       blocks=blocks, interpret=interpret)
    # Zero head-dim padding leaves q.k unchanged and adds zero output columns.
    H_pad = H if H % _LANES == 0 or H == 64 else base.round_up(H, _LANES)

    def to_blocks(x_BLXH, length):
        x_BXLH = jnp.swapaxes(x_BLXH, 1, 2)
        return jnp.pad(x_BXLH, ((0, 0), (0, 0), (0, length - x_BXLH.shape[2]), (0, H_pad - H)))

    ids = ()
    if q_ids is not None:
        q_ids_BT, kv_ids_BS = base.pad_segment_ids(q_ids, kv_ids, T_pad, S_pad)
        ids = (jnp.broadcast_to(q_ids_BT[:, None, :], (B, _SUBLANES, T_pad)),
               jnp.broadcast_to(kv_ids_BS[:, None, :], (B, _SUBLANES, S_pad)))
    costs = tpu_tuning.cost_estimates(cfg, B, q.shape[2], T_pad, S_pad, H_pad, q.dtype.itemsize)
    return cfg, costs, (to_blocks(q, T_pad), to_blocks(k, S_pad), to_blocks(v, S_pad)), ids


# ----------------------------------------------------------------------------
# Kernels. Row statistics (lse, delta) and segment ids arrive as rows of
# sublane-broadcast [8, block] tiles; the kernels that need them as columns
# convert once per block into lane-broadcast [block, 128] VMEM scratch.


def _fwd_kernel(*refs, cfg: Config, steps: int, num_q: int, num_kv: int):
    (q_list, kv_list, flags), ranges, refs = tiles.prefetched(cfg, refs, 3)
    if cfg.has_segment_ids:
        (q_ref, k_ref, v_ref, q_ids_ref, kv_ids_ref, o_ref, lse_ref, m_ref, l_ref,
         acc_ref, q_scaled, q_ids_col) = refs
    else:
        q_ref, k_ref, v_ref, o_ref, lse_ref, m_ref, l_ref, acc_ref, q_scaled = refs
    bq, bk = cfg.blocks.block_q, cfg.blocks.block_kv
    e = tiles.entry(cfg, steps, pl.program_id(0), pl.program_id(2))
    qi, ki, flag = q_list[e], kv_list[e], flags[e]

    @pl.when(tpu_grid.flag(flag, tpu_grid.FIRST))
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, base.MASK_VALUE, jnp.float32)
        tiles.zero(l_ref, acc_ref)
        tiles.scale_q(cfg, q_scaled, q_ref)
        if cfg.has_segment_ids:
            tiles.fill_heads(q_ids_col, tiles.row_to_column(q_ids_ref[:1, :]))

    # The kv tile is fetched whole and computed in sub-blocks of block_kv_compute keys,
    # each skipped when the causal/window band leaves it empty; only sub-blocks that
    # cross a mask edge evaluate the keep-mask.
    bc = cfg.blocks.kv_compute
    lo, hi = base.kv_block_range(cfg, qi, bq, bc)
    for c in range(bk // bc):
        j = ki * (bk // bc) + c  # sub-block index along the kv axis

        def step(masked, c=c, j=j):
            keys = pl.ds(c * bc, bc)
            s, _ = base.logits2(cfg, tiles.scaled_q(q_ref, q_scaled), k_ref[keys, :],
                                prescaled=tiles.folds_scale(q_ref.dtype))  # base 2
            keep = None
            if masked:
                ids = (tiles.column(q_ids_col), kv_ids_ref[:1, keys]) if cfg.has_segment_ids else ()
                keep = tiles.keep_mask(cfg, qi * bq, j * bc, bq, bc, *ids)
            if keep is not None:
                s = jnp.where(keep, s, base.MASK_VALUE)
            m_prev = tiles.column(m_ref)
            m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
            p = jnp.exp2(s - m_next)
            if keep is not None:
                p = jnp.where(keep, p, 0.0)  # rows with no key so far keep l == 0
            alpha = jnp.exp2(m_prev - m_next)
            l_next = alpha * tiles.column(l_ref) + jnp.sum(p, axis=1, keepdims=True)
            v = v_ref[keys, :]
            acc_ref[...] = alpha * acc_ref[...] + base.matmul(p.astype(v.dtype), v)
            tiles.fill_lanes(m_ref, m_next)
            tiles.fill_lanes(l_ref, l_next)

        seg = tiles.tile_ranges(ranges, qi, num_q, j, num_kv * (bk // bc))
        visited = tpu_grid.flag(flag, tpu_grid.VALID) & (j >= lo) & (j <= hi)
        tpu_grid.visit(visited, base.tile_needs_mask(cfg, qi * bq, j * bc, bq, bc, seg), step)

    @pl.when(tpu_grid.flag(flag, tpu_grid.LAST))
    def _finish():
        l = tiles.column(l_ref)
        empty = l == 0.0
        o_ref[...] = (acc_ref[...] / jnp.where(empty, 1.0, l)).astype(o_ref.dtype).reshape(o_ref.shape)
        # Base 2. An empty row gets MASK_VALUE (`_flash_lse_fwd` returns it unscaled); the backward still
        # gives it p = 0: exp2(MASK_VALUE - MASK_VALUE) = 1 is zeroed by the keep-mask, which every tile
        # holding an empty row evaluates (`base.tile_needs_mask`).
        lse = jnp.where(empty, base.MASK_VALUE, tiles.column(m_ref) + jnp.log2(jnp.where(empty, 1.0, l)))
        for h in range(lse_ref.shape[0]):
            lse_ref[h] = jnp.broadcast_to(tiles.column_to_row(lse[h * bq:(h + 1) * bq]), lse_ref.shape[1:])


def _dq_kernel(*refs, cfg: Config, steps: int, num_q: int, num_kv: int):
    (q_list, kv_list, flags), ranges, refs = tiles.prefetched(cfg, refs, 3)
    if cfg.has_segment_ids:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_ids_ref, kv_ids_ref,
         dq_ref, dq_acc, lse_col, delta_col, q_scaled, q_ids_col) = refs
    else:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, dq_acc, lse_col,
         delta_col, q_scaled) = refs
    bq, bk = cfg.blocks.block_q_dq, cfg.blocks.block_kv_dq
    e = tiles.entry(cfg, steps, pl.program_id(0), pl.program_id(2))
    qi, ki, flag = q_list[e], kv_list[e], flags[e]

    @pl.when(tpu_grid.flag(flag, tpu_grid.FIRST))
    def _init():
        tiles.zero(dq_acc)
        tiles.scale_q(cfg, q_scaled, q_ref)
        tiles.columns_from_rows(lse_col, lse_ref)
        tiles.columns_from_rows(delta_col, delta_ref)
        if cfg.has_segment_ids:
            tiles.fill_heads(q_ids_col, tiles.row_to_column(q_ids_ref[:1, :]))

    def step(masked):
        k = k_ref[...]
        keep = None
        if masked:
            ids = (tiles.column(q_ids_col), kv_ids_ref[:1, :]) if cfg.has_segment_ids else ()
            keep = tiles.keep_mask(cfg, qi * bq, ki * bk, bq, bk, *ids)
        _, ds = base.probs_and_dlogits2(cfg, tiles.scaled_q(q_ref, q_scaled), k, tiles.flat(do_ref), v_ref[...],
                                        tiles.column(lse_col), tiles.column(delta_col), keep,
                                        prescaled=tiles.folds_scale(q_ref.dtype))
        dq_acc[...] += base.matmul(ds.astype(k.dtype), k)

    seg = tiles.tile_ranges(ranges, qi, num_q, ki, num_kv)
    tpu_grid.visit(tpu_grid.flag(flag, tpu_grid.VALID), base.tile_needs_mask(cfg, qi * bq, ki * bk, bq, bk, seg),
                   step)

    @pl.when(tpu_grid.flag(flag, tpu_grid.LAST))
    def _finish():
        dq_ref[...] = dq_acc[...].astype(dq_ref.dtype).reshape(dq_ref.shape)


def _dkv_kernel(*refs, cfg: Config, steps: int, num_q: int, num_kv: int):
    # Works on transposed tiles [block_kv, block_q] (keys on sublanes), so that
    # dv = p.T @ do and dk = ds.T @ q are plain matmuls and lse/delta are rows.
    (kv_list, _, q_list, flags), ranges, refs = tiles.prefetched(cfg, refs, 4)
    if cfg.has_segment_ids:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_ids_ref, kv_ids_ref,
         dk_ref, dv_ref, dk_acc, dv_acc, kv_ids_col) = refs
    else:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_acc,
         dv_acc) = refs
    bq, bk = cfg.blocks.block_q_dkv, cfg.blocks.block_kv_dkv
    e = tiles.entry(cfg, steps, pl.program_id(0), pl.program_id(2))
    ki, qi, flag = kv_list[e], q_list[e], flags[e]

    @pl.when(tpu_grid.flag(flag, tpu_grid.FIRST))
    def _init():
        tiles.zero(dk_acc, dv_acc)
        if cfg.has_segment_ids:
            tiles.fill_lanes(kv_ids_col, tiles.row_to_column(kv_ids_ref[:1, :]))

    def step(masked):
        q, do = q_ref[...], do_ref[...]
        keep = None
        if masked:
            ids = (q_ids_ref[:1, :], tiles.column(kv_ids_col)) if cfg.has_segment_ids else (None, None)
            keep = base.tile_keep_mask(cfg, qi * bq, ki * bk, bq, bk, *ids, transposed=True)
        fold = tiles.folds_scale(q.dtype)
        q_scaled = (q * base.q_scale2(cfg)).astype(q.dtype) if fold else q
        pt, dst = base.probs_and_dlogits2(cfg, k_ref[...], q_scaled, v_ref[...], do,
                                          lse_ref[:1, :], delta_ref[:1, :], keep, prescaled=fold)
        dv_acc[...] += base.matmul(pt.astype(do.dtype), do)
        dk_acc[...] += base.matmul(dst.astype(q.dtype), q)

    seg = tiles.tile_ranges(ranges, qi, num_q, ki, num_kv)
    tpu_grid.visit(tpu_grid.flag(flag, tpu_grid.VALID), base.tile_needs_mask(cfg, qi * bq, ki * bk, bq, bk, seg),
                   step)

    @pl.when(tpu_grid.flag(flag, tpu_grid.LAST))
    def _finish():
        dk_ref[...] = dk_acc[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


# ----------------------------------------------------------------------------
# pallas_call wrappers.


def _pallas_call(kernel, cfg: Config, *, grid, in_specs, out_specs, out_shape,
                 scratch_shapes, semantics, name, cost, num_prefetch, **kernel_kwargs):
    kwargs = {}
    if not cfg.interpret:
        kwargs["compiler_params"] = pltpu.CompilerParams(
            dimension_semantics=semantics, vmem_limit_bytes=cfg.blocks.vmem_limit_bytes)
    return pl.pallas_call(
        functools.partial(kernel, cfg=cfg, **kernel_kwargs),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=num_prefetch, grid=grid, in_specs=in_specs,
            out_specs=out_specs, scratch_shapes=scratch_shapes),
        out_shape=out_shape, interpret=cfg.interpret, name=name, cost_estimate=cost, **kwargs)


def _row_spec(block_rows, width, index_map):
    """Spec of a [B, N, L, width] array tiled by rows."""
    return pl.BlockSpec((_SQUEEZED, _SQUEEZED, block_rows, width), index_map)


def _heads_spec(heads, block_rows, width, index_map):
    """Spec of a [B, N, L, width] array tiled by `heads` heads and rows."""
    return pl.BlockSpec((_SQUEEZED, heads, block_rows, width), index_map)


def _stat_spec(block, index_map):
    """Spec of a [B, N, 8, L] sublane-broadcast row statistic (lse, delta)."""
    return pl.BlockSpec((_SQUEEZED, _SQUEEZED, _SUBLANES, block), index_map)


def _ids_spec(block, index_map):
    """Spec of [B, 8, L] sublane-broadcast segment ids."""
    return pl.BlockSpec((_SQUEEZED, _SUBLANES, block), index_map)


def _out_like(shape, dtype, like):
    """Output shape that varies over the same manual mesh axes as `like`: needed
    when the caller runs us inside a shard_map with check_vma=True."""
    mat = getattr(jax.typeof(like), "mat", None)
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=mat)


def _lanes(rows, dtype=jnp.float32):
    return pltpu.VMEM((rows, _LANES), dtype)


def _q_major_specs(cfg: Config, steps, bq, bk, H, *, stats):
    """In specs of the forward and dq calls (grid b, head step n, list step; the tile lists
    (q block, kv block, flags) scalar-prefetched) and the q and statistics specs. Head step
    n takes `heads` query heads (block n of the head axis) of kv head n // (G / heads)."""
    entry = functools.partial(tiles.entry, cfg, steps)
    heads = tiles.heads_per_step(cfg)
    q_map = lambda b, n, s, ql, kl, *_: (b, n, ql[entry(b, s)], 0)
    kv_map = lambda b, n, s, ql, kl, *_: (b, lax.div(n, cfg.groups // heads), kl[entry(b, s)], 0)
    stat_map = lambda b, n, s, ql, kl, *_: (b, n, 0, ql[entry(b, s)])
    q_spec = _heads_spec(heads, bq, H, q_map)
    stat_spec = _heads_spec(heads, _SUBLANES, bq, stat_map)
    in_specs = [q_spec, _row_spec(bk, H, kv_map), _row_spec(bk, H, kv_map)]
    if stats:  # do, lse, delta
        in_specs += [q_spec, stat_spec, stat_spec]
    if cfg.has_segment_ids:
        in_specs += [_ids_spec(bq, lambda b, n, s, ql, kl, *_: (b, 0, ql[entry(b, s)])),
                     _ids_spec(bk, lambda b, n, s, ql, kl, *_: (b, 0, kl[entry(b, s)]))]
    return in_specs, q_spec, stat_spec


def _fwd_call(cfg: Config, cost, q, k, v, *ids):
    B, N, T, H = q.shape
    S = k.shape[2]
    bq, bk, bc = cfg.blocks.block_q, cfg.blocks.block_kv, cfg.blocks.kv_compute
    *lists, steps = tpu_grid.q_major_lists(cfg, bq, bk, T // bq, S // bk, tiles.list_ranges(ids, bq, bk))
    prefetch = (*lists, *tiles.segment_ranges(ids, bq, bc))
    in_specs, q_spec, stat_spec = _q_major_specs(cfg, steps, bq, bk, H, stats=False)
    rows = tiles.heads_per_step(cfg) * bq
    scratch = [_lanes(rows), _lanes(rows), pltpu.VMEM((rows, H), jnp.float32), tiles.q_scratch(rows, H, q.dtype)]
    if ids:
        scratch.append(_lanes(rows, jnp.int32))
    return _pallas_call(
        _fwd_kernel, cfg, grid=(B, N // tiles.heads_per_step(cfg), steps), in_specs=in_specs,
        out_specs=[q_spec, stat_spec],
        out_shape=[_out_like(q.shape, q.dtype, q),
                   _out_like((B, N, _SUBLANES, T), jnp.float32, q)],
        scratch_shapes=scratch, num_prefetch=len(prefetch),
        semantics=("parallel", "parallel", "arbitrary"), name="flash_fwd", cost=cost,
        steps=steps, num_q=T // bq, num_kv=S // bk)(*prefetch, q, k, v, *ids)


def _dq_call(cfg: Config, cost, q, k, v, do, lse, delta, *ids):
    B, N, T, H = q.shape
    S = k.shape[2]
    bq, bk = cfg.blocks.block_q_dq, cfg.blocks.block_kv_dq
    *lists, steps = tpu_grid.q_major_lists(cfg, bq, bk, T // bq, S // bk, tiles.list_ranges(ids, bq, bk))
    prefetch = (*lists, *tiles.segment_ranges(ids, bq, bk))
    in_specs, q_spec, _ = _q_major_specs(cfg, steps, bq, bk, H, stats=True)
    rows = tiles.heads_per_step(cfg) * bq
    scratch = [pltpu.VMEM((rows, H), jnp.float32), _lanes(rows), _lanes(rows), tiles.q_scratch(rows, H, q.dtype)]
    if ids:
        scratch.append(_lanes(rows, jnp.int32))
    return _pallas_call(
        _dq_kernel, cfg, grid=(B, N // tiles.heads_per_step(cfg), steps), in_specs=in_specs,
        out_specs=q_spec,
        out_shape=_out_like(q.shape, q.dtype, q), scratch_shapes=scratch, num_prefetch=len(prefetch),
        semantics=("parallel", "parallel", "arbitrary"), name="flash_dq", cost=cost,
        steps=steps, num_q=T // bq, num_kv=S // bk)(*prefetch, q, k, v, do, lse, delta, *ids)


def _dkv_call(cfg: Config, cost, q, k, v, do, lse, delta, *ids):
    B, _, T, H = q.shape
    K, S = k.shape[1], k.shape[2]
    G = cfg.groups
    bq, bk = cfg.blocks.block_q_dkv, cfg.blocks.block_kv_dkv
    *lists, steps = tpu_grid.kv_major_lists(cfg, bq, bk, T // bq, S // bk, G, tiles.list_ranges(ids, bq, bk))
    prefetch = (*lists, *tiles.segment_ranges(ids, bq, bk))
    entry = functools.partial(tiles.entry, cfg, steps)
    # Grid (b, kv head h, list step); list entries (kv block, head g of the group, q block).
    q_map = lambda b, h, s, kl, gl, ql, *_: (b, h * G + gl[entry(b, s)], ql[entry(b, s)], 0)
    kv_map = lambda b, h, s, kl, *_: (b, h, kl[entry(b, s)], 0)
    stat_map = lambda b, h, s, kl, gl, ql, *_: (b, h * G + gl[entry(b, s)], 0, ql[entry(b, s)])
    in_specs = [_row_spec(bq, H, q_map), _row_spec(bk, H, kv_map), _row_spec(bk, H, kv_map),
                _row_spec(bq, H, q_map), _stat_spec(bq, stat_map), _stat_spec(bq, stat_map)]
    scratch = [pltpu.VMEM((bk, H), jnp.float32), pltpu.VMEM((bk, H), jnp.float32)]
    if ids:
        in_specs += [_ids_spec(bq, lambda b, h, s, kl, gl, ql, *_: (b, 0, ql[entry(b, s)])),
                     _ids_spec(bk, lambda b, h, s, kl, *_: (b, 0, kl[entry(b, s)]))]
        scratch.append(_lanes(bk, jnp.int32))
    return _pallas_call(
        _dkv_kernel, cfg, grid=(B, K, steps), in_specs=in_specs,
        out_specs=[_row_spec(bk, H, kv_map), _row_spec(bk, H, kv_map)],
        out_shape=[_out_like(k.shape, k.dtype, k), _out_like(v.shape, v.dtype, v)],
        scratch_shapes=scratch, num_prefetch=len(prefetch),
        semantics=("parallel", "parallel", "arbitrary"), name="flash_dkv", cost=cost,
        steps=steps, num_q=T // bq, num_kv=S // bk)(*prefetch, q, k, v, do, lse, delta, *ids)


# ----------------------------------------------------------------------------
# custom_vjp on the padded [B, N, L, H] layout.


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _flash(cfg, costs, q, k, v, sinks, *ids):
    """Attention on padded [B, N, L, H] inputs; sinks [N] or None; ids are [B, 8, L] or
    absent; costs are the (fwd, dq, dkv) `pl.CostEstimate`s."""
    return _flash_fwd(cfg, costs, q, k, v, sinks, *ids)[0]


def _flash_fwd(cfg, costs, q, k, v, sinks, *ids):
    out, lse = _forward(cfg, costs, q, k, v, *ids)
    if sinks is not None:
        w_BNT, lse = base.apply_sinks(lse, sinks, base2=True)
        out = (out.astype(jnp.float32) * w_BNT[..., None]).astype(out.dtype)
    return out, (q, k, v, sinks, out, lse, ids)


def _flash_bwd(cfg, costs, residuals, do):
    q, k, v, sinks, out, lse_BNT, ids = residuals
    delta_BNT = _delta(out, do)
    dq, dk, dv = _backward(cfg, costs, q, k, v, do, lse_BNT, delta_BNT, ids)
    dsinks = None if sinks is None else base.sinks_grad(sinks, lse_BNT, delta_BNT, base2=True)
    return (dq, dk, dv, dsinks) + tuple(None for _ in ids)


_flash.defvjp(_flash_fwd, _flash_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _flash_lse(cfg, costs, q, k, v, *ids):
    """`_flash` without sinks that also returns the natural row log-sum-exp [B, N, L] (float32;
    `base.MASK_VALUE` for rows with nothing to attend to)."""
    return _flash_lse_fwd(cfg, costs, q, k, v, *ids)[0]


def _flash_lse_fwd(cfg, costs, q, k, v, *ids):
    out, lse2 = _forward(cfg, costs, q, k, v, *ids)
    lse = jnp.where(lse2 == base.MASK_VALUE, base.MASK_VALUE, lse2 * _LN_2)
    return (out, lse), (q, k, v, out, lse2, ids)


def _flash_lse_bwd(cfg, costs, residuals, cotangents):
    # With lse = log sum_j exp(s_j) an output too, dL/ds_j = p_j (dp_j - delta + dlse): the usual
    # backward with delta - dlse (natural units, as delta) in place of delta.
    q, k, v, out, lse2_BNT, ids = residuals
    do, dlse_BNT = cotangents
    delta_BNT = _delta(out, do) - dlse_BNT.astype(jnp.float32)
    return _backward(cfg, costs, q, k, v, do, lse2_BNT, delta_BNT, ids) + tuple(None for _ in ids)


_flash_lse.defvjp(_flash_lse_fwd, _flash_lse_bwd)


def _forward(cfg, costs, q, k, v, *ids):
    """(out [B, N, L, H], base-2 lse [B, N, L] float32) of the forward kernel."""
    out, lse = _fwd_call(cfg, costs[0], q, k, v, *ids)
    return out, lse[:, :, 0, :]  # one sublane of the statistic is the residual (8x less memory)


def _delta(out, do):
    """rowsum(out * do) [B, N, L] in float32."""
    return jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)


def _backward(cfg, costs, q, k, v, do, lse_BNT, delta_BNT, ids):
    """(dq, dk, dv) of the dq and dk/dv kernels from the base-2 lse and delta [B, N, L]."""
    B, N, T, _ = q.shape
    lse, delta = (jnp.broadcast_to(x_BNT[:, :, None, :], (B, N, _SUBLANES, T))
                  for x_BNT in (lse_BNT, delta_BNT))
    do = do.astype(q.dtype)
    dq = _dq_call(cfg, costs[1], q, k, v, do, lse, delta, *ids)
    dk, dv = _dkv_call(cfg, costs[2], q, k, v, do, lse, delta, *ids)
    return dq, dk, dv
