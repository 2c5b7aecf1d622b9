"""Mosaic GPU flash attention (see `kernels.gpu_mosaic`): the backward kernels, dq and dk/dv.

Both recompute the base-2 probabilities p = exp2(s2 - lse2) from the forward's base-2 log-sum-exp
and take delta = rowsum(out * do) (computed by XLA). With x = scale * q.k the natural logits and
ds = p * (dp - delta) * cap'(x) (cap' = 1 - tanh^2 with a soft cap, else 1):
  dk = scale * ds^T @ q = (scale / q_factor) * ds^T @ q_scaled;   dv = p^T @ do;
  d/d(q_scaled) = (scale / q_factor) * ds @ k (the caller's q_scaled = q * q_factor adds the rest).

dq: one CTA per (q head, q tile of wgs * block_q_dq rows, batch row); a producer warpgroup streams
K/V blocks of the tile's kv range through a ring of `stages` shared-memory slots (TMA), the compute
warpgroups accumulate dq over them (3 wgmmas per block: s, dp, dq).
dk/dv: one CTA per (kv head, kv tile of wgs * block_kv_dkv rows, batch row); the producer streams,
for each of the G query heads of this kv head (GQA: K/V are read once per group, dk/dv are never
materialised per query head) and each q block of the tile's q range (`kernels.base.q_block_range`),
the q and do blocks with their lse, delta and segment ids; 4 wgmmas per block (s^T, dv, dp^T, dk).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels import base
from kernels.base import Config
from kernels.gpu_mosaic_fwd import (
    capped_logits2,
    interpret_params,
    matmul,
    operand,
    plgpu,
    produce,
    produce_kv,
    q_factor,
    rows_of,
    smem_transforms,
    split_loop,
    staging,
    tile_mask,
    unmasked_kv_steps,
    unmasked_q_steps,
)

PRODUCER_REGISTERS = 40


def _dlogits(cfg: Config, p, dp, delta, t, delta_dims):
    """ds = p * (dp - delta) * cap' in natural units (see the module docstring)."""
    ds = p * (dp - lax.broadcast_in_dim(delta, p.shape, delta_dims))
    return ds if t is None else ds * (1.0 - t * t)


def _dq_kernel(q_ref, k_ref, v_ref, q_ids_ref, kv_ids_ref, do_ref, lse_ref, delta_ref, dq_ref, smem, bars, *,
               cfg: Config, wgs: int):
    q_smem2, do_smem2, lse_smem2, delta_smem2, q_ids_smem2, k_smem, v_smem, kv_ids_smem, ds_smem2 = smem
    row_bars, k_bars, v_bars, ids_bars, done = bars
    block_q, block_kv, stages = cfg.blocks.block_q_dq, cfg.blocks.block_kv_dq, cfg.blocks.stages
    head_dim = q_ref.shape[-1]
    batch, head = lax.axis_index("batch"), lax.axis_index("heads")
    tile, wg = lax.axis_index("q_seq"), lax.axis_index("wg")
    lo, hi = base.kv_block_range(cfg, tile, wgs * block_q, block_kv)
    steps = jnp.maximum(hi - lo + 1, 0)
    ids = cfg.has_segment_ids
    row, col = plgpu.Layout.WGMMA.reduce(1), plgpu.Layout.WGMMA.reduce(0)

    @pl.when(wg < wgs)
    def _compute():
        plgpu.set_max_registers(compute_registers(wgs), action="increase")
        row0 = tile * (wgs * block_q) + wg * block_q
        rows = pl.ds(row0, block_q)
        srcs = [q_ref.at[batch, rows, head], do_ref.at[batch, rows, head], lse_ref.at[batch, head, rows],
                delta_ref.at[batch, head, rows]] + ([q_ids_ref.at[batch, rows]] if ids else [])
        dsts = [q_smem2, do_smem2, lse_smem2, delta_smem2, q_ids_smem2]
        for i, (src, dst) in enumerate(zip(srcs, dsts)):
            plgpu.copy_gmem_to_smem(src, dst.at[wg], row_bars.at[i * wgs + wg])
        for i in range(len(srcs)):
            plgpu.barrier_wait(row_bars.at[i * wgs + wg])
        q_smem, do_smem = q_smem2.at[wg], do_smem2.at[wg]
        lse, delta = rows_of(lse_smem2.at[wg], row), rows_of(delta_smem2.at[wg], row)
        q_ids = rows_of(q_ids_smem2.at[wg] if ids else None, row)

        def step(j, dq, masked):
            slot = lax.rem(j, stages)
            plgpu.barrier_wait(k_bars.at[slot])
            s, t = capped_logits2(cfg, matmul(q_smem, k_smem.at[slot].T, (block_q, block_kv)))
            kv_ids = None
            if ids:
                plgpu.barrier_wait(ids_bars.at[slot])
                kv_ids = plgpu.load(kv_ids_smem.at[slot], layout=col)
            keep = tile_mask(cfg, row0, (lo + j) * block_kv, (block_q, block_kv), q_ids, kv_ids) if masked else None
            if keep is not None:
                s = jnp.where(keep, s, base.MASK_VALUE)
            p = jnp.exp2(s - lax.broadcast_in_dim(lse, s.shape, [0]))
            if keep is not None:
                p = jnp.where(keep, p, 0.0)
            plgpu.barrier_wait(v_bars.at[slot])
            dp = matmul(do_smem, v_smem.at[slot].T, (block_q, block_kv))
            ds = _dlogits(cfg, p, dp, delta, t, [0])
            dq = dq + matmul(operand(ds.astype(k_smem.dtype), ds_smem2, wg), k_smem.at[slot], (block_q, head_dim))
            plgpu.barrier_arrive(done.at[slot])
            return dq

        dq = plgpu.layout_cast(jnp.zeros((block_q, head_dim), jnp.float32), plgpu.Layout.WGMMA)
        dq = split_loop(steps, unmasked_kv_steps(cfg, lo, steps, row0, block_q, block_kv), step, dq)
        q_smem[...] = (dq * (cfg.scale / q_factor(cfg))).astype(q_smem.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[batch, rows, head])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == wgs)
    def _produce():
        n = 3 if ids else 2
        produce_kv(cfg, steps, stages, (done,), registers=PRODUCER_REGISTERS, batch=batch, head=head, lo=lo,
                   block_kv=block_kv, refs=(k_ref, v_ref, kv_ids_ref)[:n], smems=(k_smem, v_smem, kv_ids_smem)[:n],
                   bars=(k_bars, v_bars, ids_bars)[:n])


def _dkv_kernel(q_ref, k_ref, v_ref, q_ids_ref, kv_ids_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref,
                smem, bars, *, cfg: Config, wgs: int):
    k_smem2, v_smem2, kv_ids_smem2, q_smem, do_smem, lse_smem, delta_smem, q_ids_smem, p_smem2 = smem
    own_bars, q_bars, do_bars, lse_bars, delta_bars, ids_bars, done = bars
    block_q, block_kv, stages = cfg.blocks.block_q_dkv, cfg.blocks.block_kv_dkv, cfg.blocks.stages
    head_dim = k_ref.shape[-1]
    group = cfg.groups
    batch, kv_head = lax.axis_index("batch"), lax.axis_index("heads")
    tile, wg = lax.axis_index("kv_seq"), lax.axis_index("wg")
    lo, hi = base.q_block_range(cfg, tile, block_q, wgs * block_kv)
    span = jnp.maximum(hi - lo + 1, 0)
    steps = group * span  # (query head g, q block lo + i) for g < G, i < span
    ids = cfg.has_segment_ids
    row, col = plgpu.Layout.WGMMA.reduce(1), plgpu.Layout.WGMMA.reduce(0)

    def q_block(j):
        return lo + lax.rem(j, jnp.maximum(span, 1))

    @pl.when(wg < wgs)
    def _compute():
        plgpu.set_max_registers(compute_registers(wgs), action="increase")
        key0 = tile * (wgs * block_kv) + wg * block_kv
        keys = pl.ds(key0, block_kv)
        srcs = [k_ref.at[batch, keys, kv_head], v_ref.at[batch, keys, kv_head]]
        srcs += [kv_ids_ref.at[batch, keys]] if ids else []
        for i, (src, dst) in enumerate(zip(srcs, (k_smem2, v_smem2, kv_ids_smem2))):
            plgpu.copy_gmem_to_smem(src, dst.at[wg], own_bars.at[i * wgs + wg])
        for i in range(len(srcs)):
            plgpu.barrier_wait(own_bars.at[i * wgs + wg])
        k_smem, v_smem = k_smem2.at[wg], v_smem2.at[wg]
        kv_ids = rows_of(kv_ids_smem2.at[wg] if ids else None, row)

        def step(j, carry, masked):
            dk, dv = carry
            slot = lax.rem(j, stages)
            plgpu.barrier_wait(q_bars.at[slot])
            s, t = capped_logits2(cfg, matmul(k_smem, q_smem.at[slot].T, (block_kv, block_q)))
            q_ids = None
            if ids:
                plgpu.barrier_wait(ids_bars.at[slot])
                q_ids = plgpu.load(q_ids_smem.at[slot], layout=col)
            keep = (tile_mask(cfg, q_block(j) * block_q, key0, (block_kv, block_q), q_ids, kv_ids, transposed=True)
                    if masked else None)
            if keep is not None:
                s = jnp.where(keep, s, base.MASK_VALUE)
            plgpu.barrier_wait(lse_bars.at[slot])
            p = jnp.exp2(s - lax.broadcast_in_dim(plgpu.load(lse_smem.at[slot], layout=col), s.shape, [1]))
            if keep is not None:
                p = jnp.where(keep, p, 0.0)
            plgpu.barrier_wait(do_bars.at[slot])
            dv = dv + matmul(operand(p.astype(do_smem.dtype), p_smem2, wg), do_smem.at[slot], (block_kv, head_dim))
            dp = matmul(v_smem, do_smem.at[slot].T, (block_kv, block_q))
            plgpu.barrier_wait(delta_bars.at[slot])
            ds = _dlogits(cfg, p, dp, plgpu.load(delta_smem.at[slot], layout=col), t, [1])
            dk = dk + matmul(operand(ds.astype(q_smem.dtype), p_smem2, wg), q_smem.at[slot], (block_kv, head_dim))
            plgpu.barrier_arrive(done.at[slot])
            return dk, dv

        zeros = plgpu.layout_cast(jnp.zeros((block_kv, head_dim), jnp.float32), plgpu.Layout.WGMMA)
        unmasked = unmasked_q_steps(cfg, lo, span, key0, block_kv, block_q)

        def head(g, carry):  # the q blocks of query head g of this kv head's group
            return split_loop(span, unmasked, lambda r, c, masked: step(g * span + r, c, masked), carry)
        dk, dv = lax.fori_loop(0, group, head, (zeros, zeros))
        k_smem[...] = (dk * (cfg.scale / q_factor(cfg))).astype(k_smem.dtype)
        v_smem[...] = dv.astype(v_smem.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[batch, keys, kv_head])
        plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[batch, keys, kv_head])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == wgs)
    def _produce():
        plgpu.set_max_registers(PRODUCER_REGISTERS, action="decrease")
        def fetch(j, slot):
            head = kv_head * group + lax.div(j, jnp.maximum(span, 1))
            rows = pl.ds(q_block(j) * block_q, block_q)
            plgpu.copy_gmem_to_smem(q_ref.at[batch, rows, head], q_smem.at[slot], q_bars.at[slot])
            plgpu.copy_gmem_to_smem(lse_ref.at[batch, head, rows], lse_smem.at[slot], lse_bars.at[slot])
            plgpu.copy_gmem_to_smem(do_ref.at[batch, rows, head], do_smem.at[slot], do_bars.at[slot])
            plgpu.copy_gmem_to_smem(delta_ref.at[batch, head, rows], delta_smem.at[slot], delta_bars.at[slot])
            if ids:
                plgpu.copy_gmem_to_smem(q_ids_ref.at[batch, rows], q_ids_smem.at[slot], ids_bars.at[slot])

        produce(steps, stages, fetch, (done,))


def compute_registers(wgs: int) -> int:
    """Registers per thread of a compute warpgroup: the 64K register file less the producer's 40,
    shared by the compute warpgroups (multiples of 8, at most 256)."""
    return min(256, (65536 // 128 - PRODUCER_REGISTERS) // wgs // 8 * 8)


def backward_wgs(head_dim: int) -> int:
    """Compute warpgroups of the backward kernels: two up to head_dim 128; one above, so that the
    per-warpgroup tiles and the pipeline ring fit in shared memory."""
    return 2 if head_dim <= 128 else 1


def _call(kernel, cfg, wgs, grid, grid_names, smem, bars, out_type, *args):
    return plgpu.kernel(
        functools.partial(kernel, cfg=cfg, wgs=wgs), out_type=out_type, scratch_types=[smem, bars],
        grid=grid, grid_names=grid_names, num_threads=wgs + 1, thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret_params(cfg.interpret),
    )(*args)


def dq(cfg: Config, q, k, v, q_ids, kv_ids, do, lse, delta):
    """The gradient w.r.t. the padded, q_factor-scaled q [B, T, N, H], in q's dtype."""
    batch, q_len, num_heads, head_dim = q.shape
    b, wgs, dt = cfg.blocks, backward_wgs(head_dim), q.dtype
    tf = smem_transforms(head_dim, dt)
    ids = cfg.has_segment_ids
    smem = (plgpu.SMEM((wgs, b.block_q_dq, head_dim), dt, transforms=tf),
            plgpu.SMEM((wgs, b.block_q_dq, head_dim), dt, transforms=tf),
            plgpu.SMEM((wgs, b.block_q_dq), jnp.float32), plgpu.SMEM((wgs, b.block_q_dq), jnp.float32),
            plgpu.SMEM((wgs, b.block_q_dq), jnp.int32) if ids else None,
            plgpu.SMEM((b.stages, b.block_kv_dq, head_dim), dt, transforms=tf),
            plgpu.SMEM((b.stages, b.block_kv_dq, head_dim), dt, transforms=tf),
            plgpu.SMEM((b.stages, b.block_kv_dq), jnp.int32) if ids else None,
            staging(cfg, wgs, b.block_q_dq, b.block_kv_dq, dt))
    bars = ((plgpu.Barrier(num_barriers=5 * wgs),) + (plgpu.Barrier(num_barriers=b.stages),) * 3
            + (plgpu.Barrier(num_arrivals=wgs, num_barriers=b.stages),))
    return _call(_dq_kernel, cfg, wgs, (num_heads, q_len // (wgs * b.block_q_dq), batch),
                 ("heads", "q_seq", "batch"), smem, bars, jax.ShapeDtypeStruct(q.shape, dt),
                 q, k, v, q_ids, kv_ids, do, lse, delta)


def dkv(cfg: Config, q, k, v, q_ids, kv_ids, do, lse, delta):
    """(dk, dv) [B, S, K, H] in k's dtype from padded, q_factor-scaled q."""
    batch, kv_len, num_kv_heads, head_dim = k.shape
    b, wgs, dt = cfg.blocks, backward_wgs(head_dim), q.dtype
    tf = smem_transforms(head_dim, dt)
    ids = cfg.has_segment_ids
    smem = (plgpu.SMEM((wgs, b.block_kv_dkv, head_dim), dt, transforms=tf),
            plgpu.SMEM((wgs, b.block_kv_dkv, head_dim), dt, transforms=tf),
            plgpu.SMEM((wgs, b.block_kv_dkv), jnp.int32) if ids else None,
            plgpu.SMEM((b.stages, b.block_q_dkv, head_dim), dt, transforms=tf),
            plgpu.SMEM((b.stages, b.block_q_dkv, head_dim), dt, transforms=tf),
            plgpu.SMEM((b.stages, b.block_q_dkv), jnp.float32),
            plgpu.SMEM((b.stages, b.block_q_dkv), jnp.float32),
            plgpu.SMEM((b.stages, b.block_q_dkv), jnp.int32) if ids else None,
            staging(cfg, wgs, b.block_kv_dkv, b.block_q_dkv, dt))
    bars = ((plgpu.Barrier(num_barriers=3 * wgs),) + (plgpu.Barrier(num_barriers=b.stages),) * 5
            + (plgpu.Barrier(num_arrivals=wgs, num_barriers=b.stages),))
    out = jax.ShapeDtypeStruct(k.shape, k.dtype)
    return _call(_dkv_kernel, cfg, wgs, (num_kv_heads, kv_len // (wgs * b.block_kv_dkv), batch),
                 ("heads", "kv_seq", "batch"), smem, bars, [out, out],
                 q, k, v, q_ids, kv_ids, do, lse, delta)
