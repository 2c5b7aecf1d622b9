"""Mosaic GPU flash attention (see `kernels.gpu_mosaic`): shared kernel helpers and the forward kernel.

Forward: one CTA per (q head, q tile of COMPUTE_WGS * block_q rows, batch row), COMPUTE_WGS + 1
warpgroups. The last warpgroup is the producer: it streams the K/V blocks (and their segment ids) of
the tile's kv-block range (`kernels.base.kv_block_range`: blocks the causal mask or the window rule
out are never fetched) into a `stages`-deep ring of shared-memory slots with TMA, waiting on each
slot's "consumed" barrier before refilling it. Each compute warpgroup owns block_q rows: S = Q K^T and
O += P V on the tensor cores (wgmma), online softmax in base 2 with `exp2` (q arrives multiplied by
scale * log2(e), see `q_factor`), then the output and the base-2 log-sum-exp leave through shared
memory by TMA. Each warpgroup splits its kv loop into masked / unmasked / masked runs (`split_loop`):
only blocks crossing the diagonal, the window edge, the kv padding (or any block, with segment ids)
build a mask.

Inputs arrive padded (`kernels.gpu_mosaic.prepare`): lengths are multiples of the tiles; padded keys
are masked, padded query rows are sliced off by the caller.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels import base
from kernels.base import Config

try:  # jax >= 0.12 for the API below; older jax imports this module without it.
    from jax.experimental.pallas import mosaic_gpu as plgpu
    InterpretGPUParams = getattr(plgpu, "InterpretGPUParams", None)
except ImportError:  # pragma: no cover - a jax without the Mosaic GPU backend
    plgpu = None
    InterpretGPUParams = None

# The Mosaic GPU API this code is written against comes with jax >= 0.12 (as does GPU interpret mode).
AVAILABLE = InterpretGPUParams is not None
LOG2E = math.log2(math.e)
# Finite stand-in for +inf: the (base-2) log-sum-exp of a row where every key is masked.
EMPTY_ROW_LSE = 1e30
COMPUTE_WGS = 2  # compute warpgroups of the forward; one more warpgroup is the TMA producer


def smem_transforms(minor: int, dtype):
    """(tiling, swizzle) of a [rows, minor] shared-memory operand: the largest swizzle dividing a row,
    so head dims such as 96 or 192 need no padding to a power of two."""
    bits = jnp.dtype(dtype).itemsize * 8
    swizzle = plgpu.find_swizzle(minor * bits)
    return (plgpu.TilingTransform((8, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle))


def interpret_params(interpret):
    """`interpret=` of plgpu.kernel: False -> compile for the GPU; True -> GPU interpret mode."""
    if interpret is True:
        return InterpretGPUParams()
    return interpret or None


def q_factor(cfg: base.Options) -> float:
    """What q is multiplied by before the kernels: scale * log2(e), so the logits come out in base 2;
    only the scale when a soft cap must see natural-unit logits (log2(e) is then applied after it)."""
    return cfg.scale if cfg.logits_soft_cap is not None else cfg.scale * LOG2E


def capped_logits2(cfg: base.Options, s):
    """Base-2 logits from q_factor-scaled q.k, and the soft cap's tanh (None without a cap)."""
    if cfg.logits_soft_cap is None:
        return s, None
    t = jnp.tanh(s / cfg.logits_soft_cap)
    return (cfg.logits_soft_cap * LOG2E) * t, t


def matmul(a, b, shape):
    """a @ b on the tensor cores (wgmma) into a fresh float32 accumulator of `shape`; a is a shared-
    memory ref or a register array (see `operand`), b a shared-memory ref (`.T` views transpose).

    Accumulators are fresh rather than carried with `pl.run_state` because GPU interpret mode does
    not simulate run_state (jax 0.12.0); running sums are added in registers instead."""
    def body(acc_ref):
        plgpu.wgmma(acc_ref, a, b)
        return acc_ref[...]
    return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))


def operand(x, smem2, wg):
    """The register array x as a wgmma lhs: x itself when compiled (wgmma reads A from registers),
    staged through this warpgroup's slot of smem2 in GPU interpret mode (whose wgmma reads only
    shared memory); smem2 is None when compiled."""
    if smem2 is None:
        return x
    smem2.at[wg][...] = x
    plgpu.commit_smem()
    return smem2.at[wg]


def staging(cfg: Config, wgs: int, rows: int, cols: int, dtype):
    """The shared-memory buffer `operand` stages through: only in interpret mode."""
    if not cfg.interpret:
        return None
    return plgpu.SMEM((wgs, rows, cols), dtype, transforms=smem_transforms(cols, dtype))


def rows_of(smem, layout):
    """A 1-D shared-memory vector loaded in `layout` (a WGMMA row or column vector); None if absent."""
    return None if smem is None else plgpu.load(smem, layout=layout)


def tile_mask(cfg: Config, q_start, key_start, shape, q_ids=None, kv_ids=None, transposed=False):
    """Keep-mask (WGMMA layout) of a [queries, keys] tile ([keys, queries] if transposed) whose first
    query/key are q_start/key_start; q_ids/kv_ids are the 1-D ids of its queries/keys (or None).
    None when nothing can be masked."""
    layout = plgpu.Layout.WGMMA
    q_axis = 1 if transposed else 0
    q_pos = key_pos = None
    if cfg.banded or (cfg.kv_padded and not cfg.has_segment_ids):
        q_pos = q_start + cfg.q_offset + plgpu.broadcasted_iota(jnp.int32, shape, q_axis, layout=layout)
        key_pos = key_start + plgpu.broadcasted_iota(jnp.int32, shape, 1 - q_axis, layout=layout)
    if q_ids is not None:
        q_ids = lax.broadcast_in_dim(q_ids, shape, [q_axis])
        kv_ids = lax.broadcast_in_dim(kv_ids, shape, [1 - q_axis])
    return cfg.keep_mask(q_pos, key_pos, q_ids, kv_ids)


def can_mask(cfg: Config) -> bool:
    """Whether any tile of this call can need a mask (else every loop runs unmasked)."""
    return cfg.banded or cfg.kv_padded or cfg.has_segment_ids


def split_loop(steps, unmasked, step, carry):
    """step(j, carry, masked) for j in [0, steps), in order: masked=False for j in the range
    unmasked = (first, last) (0 <= first <= last <= steps), True elsewhere; every j masked when
    unmasked is None. Only the tiles that cross the diagonal, the window edge, the kv padding or a
    segment boundary pay for the mask (iota, compares, selects)."""
    if unmasked is None:
        return lax.fori_loop(0, steps, functools.partial(step, masked=True), carry)
    first, last = unmasked
    carry = lax.fori_loop(0, first, functools.partial(step, masked=True), carry)
    carry = lax.fori_loop(first, last, functools.partial(step, masked=False), carry)
    return lax.fori_loop(last, steps, functools.partial(step, masked=True), carry)


def _clip(a, b, lo, steps):
    """(first, last) step indices of the absolute block range [a, b) within [lo, lo + steps)."""
    first = jnp.clip(a - lo, 0, steps)
    return first, jnp.clip(b - lo, first, steps)


def unmasked_kv_steps(cfg: Config, lo, steps, row0, rows: int, block_kv: int):
    """For query rows row0 .. row0 + rows - 1 visiting kv blocks lo .. lo + steps - 1: the (first,
    last) step range whose blocks no mask touches (None: every block may need one)."""
    if cfg.has_segment_ids or not can_mask(cfg):
        return None
    a, b = lo, lo + steps
    first_pos = row0 + cfg.q_offset
    if cfg.banded:  # the block's last key <= the first row's position
        b = jnp.minimum(b, lax.div(jnp.maximum(first_pos + 1, 0), block_kv))
    if cfg.sliding_window is not None:  # the block's first key > the last row's position - W
        edge = jnp.maximum(first_pos + rows - cfg.sliding_window, 0)
        a = jnp.maximum(a, lax.div(edge + block_kv - 1, block_kv))
    if cfg.kv_padded:  # no padded key in the block
        b = jnp.minimum(b, cfg.kv_len // block_kv)
    return _clip(a, b, lo, steps)


def unmasked_q_steps(cfg: Config, lo, span, key0, keys: int, block_q: int):
    """For keys key0 .. key0 + keys - 1 visiting q blocks lo .. lo + span - 1: the (first, last) step
    range whose blocks no mask touches (None: every block may need one)."""
    if cfg.has_segment_ids or not can_mask(cfg):
        return None
    a, b = lo, lo + span
    last_key = key0 + keys - 1
    if cfg.banded:  # the last key <= the block's first row position
        a = jnp.maximum(a, lax.div(jnp.maximum(last_key - cfg.q_offset, 0) + block_q - 1, block_q))
    if cfg.sliding_window is not None:  # the first key > the block's last row position - W
        edge = key0 + cfg.sliding_window - cfg.q_offset - block_q
        b = jnp.minimum(b, jnp.where(edge >= 0, lax.div(jnp.maximum(edge, 0), block_q) + 1, 0))
    if cfg.kv_padded:  # no padded key in the tile
        b = jnp.where(last_key < cfg.kv_len, b, a)
    return _clip(a, b, lo, span)


def produce(steps, stages: int, fetch, consumed):
    """The producer warpgroup's loop: fetch(j, slot) issues the TMA copies of step j into a slot; the
    first `stages` steps fill the ring, later ones wait until the compute warpgroups have arrived on
    every barrier of `consumed` for that slot."""
    for j in range(stages):
        pl.when(j < steps)(functools.partial(fetch, j, j))

    @pl.loop(0, jnp.maximum(steps - stages, 0))
    def _refill(j):
        slot = lax.rem(j, stages)
        for barrier in consumed:
            plgpu.barrier_wait(barrier.at[slot])
        fetch(j + stages, slot)


def produce_kv(cfg: Config, steps, stages: int, consumed, *, registers: int, batch, head, lo, block_kv: int,
               refs, smems, bars):
    """The producer warpgroup of a kernel that streams K/V blocks lo, lo+1, ... (and their kv segment ids:
    a third ref/smem/barrier) through the shared-memory ring; K/V of the q head's kv head, never repeated."""
    plgpu.set_max_registers(registers, action="decrease")
    kv_head = lax.div(head, cfg.groups)

    def fetch(j, slot):
        keys = pl.ds((lo + j) * block_kv, block_kv)
        for ref, smem, bar in zip(refs, smems, bars):
            index = (batch, keys, kv_head) if len(ref.shape) == 4 else (batch, keys)
            plgpu.copy_gmem_to_smem(ref.at[index], smem.at[slot], bar.at[slot])

    produce(steps, stages, fetch, consumed)


def _fwd_kernel(q_ref, k_ref, v_ref, q_ids_ref, kv_ids_ref, out_ref, lse_ref, smem, barriers, *,
                cfg: Config):
    q_smem2, k_smem, v_smem, lse_smem2, q_ids_smem2, kv_ids_smem, p_smem2 = smem
    q_bars, q_ids_bars, k_bars, v_bars, ids_bars, k_done, v_done = barriers
    block_q, block_kv, stages = cfg.blocks.block_q, cfg.blocks.block_kv, cfg.blocks.stages
    head_dim = q_ref.shape[-1]
    batch, head = lax.axis_index("batch"), lax.axis_index("heads")
    tile, wg = lax.axis_index("q_seq"), lax.axis_index("wg")
    lo, hi = base.kv_block_range(cfg, tile, COMPUTE_WGS * block_q, block_kv)
    steps = jnp.maximum(hi - lo + 1, 0)
    ids = cfg.has_segment_ids

    @pl.when(wg < COMPUTE_WGS)
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        q_smem = q_smem2.at[wg]
        row0 = tile * (COMPUTE_WGS * block_q) + wg * block_q
        rows = pl.ds(row0, block_q)
        plgpu.copy_gmem_to_smem(q_ref.at[batch, rows, head], q_smem, q_bars.at[wg])
        if ids:
            plgpu.copy_gmem_to_smem(q_ids_ref.at[batch, rows], q_ids_smem2.at[wg], q_ids_bars.at[wg])
            plgpu.barrier_wait(q_ids_bars.at[wg])
        q_ids = rows_of(q_ids_smem2.at[wg] if ids else None, plgpu.Layout.WGMMA.reduce(1))
        plgpu.barrier_wait(q_bars.at[wg])

        def step(j, carry, masked):
            acc, m, l = carry
            slot = lax.rem(j, stages)
            plgpu.barrier_wait(k_bars.at[slot])
            s, _ = capped_logits2(cfg, matmul(q_smem, k_smem.at[slot].T, (block_q, block_kv)))
            kv_ids = None
            if ids:
                plgpu.barrier_wait(ids_bars.at[slot])
                kv_ids = plgpu.load(kv_ids_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
            plgpu.barrier_arrive(k_done.at[slot])  # K and the kv ids of this slot are read
            keep = tile_mask(cfg, row0, (lo + j) * block_kv, (block_q, block_kv), q_ids, kv_ids) if masked else None
            if keep is not None:
                s = jnp.where(keep, s, base.MASK_VALUE)
            m_new = jnp.maximum(m, s.max(axis=1))
            p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
            if keep is not None:
                p = jnp.where(keep, p, 0.0)  # in an all-masked row s == m_new
            alpha = jnp.exp2(m - m_new)
            l = l * alpha + p.sum(axis=1)
            plgpu.barrier_wait(v_bars.at[slot])
            pv = matmul(operand(p.astype(v_smem.dtype), p_smem2, wg), v_smem.at[slot], (block_q, head_dim))
            plgpu.barrier_arrive(v_done.at[slot])
            return acc * lax.broadcast_in_dim(alpha, acc.shape, [0]) + pv, m_new, l

        reduced = plgpu.Layout.WGMMA.reduce(1)
        acc = plgpu.layout_cast(jnp.zeros((block_q, head_dim), jnp.float32), plgpu.Layout.WGMMA)
        m = plgpu.layout_cast(jnp.full((block_q,), base.MASK_VALUE, jnp.float32), reduced)
        l = plgpu.layout_cast(jnp.zeros((block_q,), jnp.float32), reduced)
        unmasked = unmasked_kv_steps(cfg, lo, steps, row0, block_q, block_kv)
        acc, m, l = split_loop(steps, unmasked, step, (acc, m, l))
        nonempty = l > 0.0
        safe_l = jnp.where(nonempty, l, 1.0)
        q_smem[...] = (acc / lax.broadcast_in_dim(safe_l, acc.shape, [0])).astype(q_smem.dtype)
        lse_smem2.at[wg][...] = jnp.where(nonempty, m + jnp.log2(safe_l), EMPTY_ROW_LSE)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem, out_ref.at[batch, rows, head])
        plgpu.copy_smem_to_gmem(lse_smem2.at[wg], lse_ref.at[batch, head, rows])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == COMPUTE_WGS)
    def _produce():
        n = 3 if ids else 2
        produce_kv(cfg, steps, stages, (k_done, v_done), registers=40, batch=batch, head=head, lo=lo,
                   block_kv=block_kv, refs=(k_ref, v_ref, kv_ids_ref)[:n], smems=(k_smem, v_smem, kv_ids_smem)[:n],
                   bars=(k_bars, v_bars, ids_bars)[:n])


def forward(cfg: Config, q, k, v, q_ids, kv_ids):
    """(out [B, T, N, H], base-2 lse [B, N, T] float32) of padded, q_factor-scaled inputs."""
    batch, q_len, num_heads, head_dim = q.shape
    b = cfg.blocks
    tf = smem_transforms(head_dim, q.dtype)
    ids = cfg.has_segment_ids
    smem = (plgpu.SMEM((COMPUTE_WGS, b.block_q, head_dim), q.dtype, transforms=tf),
            plgpu.SMEM((b.stages, b.block_kv, head_dim), k.dtype, transforms=tf),
            plgpu.SMEM((b.stages, b.block_kv, head_dim), v.dtype, transforms=tf),
            plgpu.SMEM((COMPUTE_WGS, b.block_q), jnp.float32),
            plgpu.SMEM((COMPUTE_WGS, b.block_q), jnp.int32) if ids else None,
            plgpu.SMEM((b.stages, b.block_kv), jnp.int32) if ids else None,
            staging(cfg, COMPUTE_WGS, b.block_q, b.block_kv, q.dtype))
    bars = ((plgpu.Barrier(num_barriers=COMPUTE_WGS),) * 2 + (plgpu.Barrier(num_barriers=b.stages),) * 3
            + (plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=b.stages),) * 2)
    return plgpu.kernel(
        functools.partial(_fwd_kernel, cfg=cfg),
        out_type=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                  jax.ShapeDtypeStruct((batch, num_heads, q_len), jnp.float32)],
        scratch_types=[smem, bars],
        grid=(num_heads, q_len // (COMPUTE_WGS * b.block_q), batch), grid_names=("heads", "q_seq", "batch"),
        num_threads=COMPUTE_WGS + 1, thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret_params(cfg.interpret),
    )(q, k, v, q_ids, kv_ids)
