"""Flash attention for NVIDIA GPUs: Pallas kernels on the Triton backend.

Forward (online softmax, logsumexp residual) and backward (one kernel for dq,
one for dk/dv) under a `jax.custom_vjp`. The semantics are those of
`kernels.reference_attention`; inputs arrive validated (`kernels.base.validate`),
and block ranges, masks and tile arithmetic come from `kernels.base`. The
BlockSpecs rely on Triton's "a block is a strided view" model (whole-sequence
K/V blocks cost nothing); the kernel bodies loop over kv (or q) tiles inside.

Letter legend: B batch, T q length, S kv length, N q heads, K kv heads,
G = N // K q heads per kv head, H head dim.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels import base
from kernels.base import Config

# Finite stand-in for +inf: the logsumexp of a row where every key is masked.
_EMPTY_ROW_LSE = 1e30
_MIN_BLOCK = 16  # Triton's tensor-core dot needs every dim >= 16.
_MAX_HEAD_DIM = 256


@dataclasses.dataclass(frozen=True)
class BlockSizes(base.BlockSizes):
    """Tile sizes and launch parameters of the GPU kernels.

    Defaults target H100 with bf16 and head_dim <= 128; `for_head_dim` halves the
    tiles for head_dim 256 so a q tile, two K/V stages and the accumulator fit in
    shared memory/registers.
    """
    num_warps: int | None = None  # None: 4 for head_dim <= 64, else 8.
    num_stages: int = 2
    MIN_BLOCK: ClassVar[int] = _MIN_BLOCK

    @classmethod
    def for_head_dim(cls, head_dim: int) -> BlockSizes:
        """Default tiles for a (padded) head dim."""
        if head_dim > 128:
            return cls(block_q=64, block_kv=32, block_q_dq=32, block_kv_dq=32, block_q_dkv=32, block_kv_dkv=32)
        return cls(block_q=128, block_kv=64, block_q_dq=64, block_kv_dq=64, block_q_dkv=64, block_kv_dkv=64)


def flash_attention(q, k, v, q_ids, kv_ids, options: base.Options, *,
                    block_sizes: BlockSizes | None = None, interpret: bool = False, sinks=None):
    """Fused attention on the Pallas Triton backend, differentiable in q, k, v (and sinks).

    Args:
      q: [B, T, N, H]; k, v: [B, S, K, H] with K dividing N. Query head n reads kv
        head n // (N // K); K/V are never repeated in memory.
      q_ids, kv_ids, options: as `kernels.base.validate` returns them.
      block_sizes: `BlockSizes`; default `BlockSizes.for_head_dim(H)`.
      interpret: run the kernels in Pallas interpret mode (CPU testing).
      sinks: float [N] or None: per-head sink logits (`kernels.base.apply_sinks`).

    Returns:
      [B, T, N, H] in q's dtype. Rows with nothing to attend to are zeros.
    """
    head_dim = q.shape[3]
    if head_dim > _MAX_HEAD_DIM:
        raise ValueError(f"head_dim {head_dim} > {_MAX_HEAD_DIM} is not supported")
    # Zero-padding the head dim is exact (zeros add nothing to q.k and give zero
    # output columns, sliced off below) and gives Triton power-of-two tiles.
    head_pad = max(_MIN_BLOCK, pl.next_power_of_2(head_dim))
    blocks = block_sizes or BlockSizes.for_head_dim(head_pad)
    cfg, q_pad, kv_pad = base.configure(options, q.shape, k.shape, has_segment_ids=q_ids is not None,
                                        blocks=blocks, interpret=interpret)

    def pad(x, length):
        return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, head_pad - head_dim)))

    if q_ids is not None:
        q_ids, kv_ids = base.pad_segment_ids(q_ids, kv_ids, q_pad, kv_pad)
    out = _flash(cfg, pad(q, q_pad), pad(k, kv_pad), pad(v, kv_pad), q_ids, kv_ids, sinks)
    return out[:, :cfg.q_len, :, :head_dim]


def _tile_ids(q_ids, kv_ids_ref, k_slice):
    """(q ids as a column, the kv tile's ids as a row) for `base.tile_keep_mask`, or ()."""
    return () if q_ids is None else (q_ids[:, None], kv_ids_ref[k_slice][None, :])


def _fwd_kernel(q_ref, k_ref, v_ref, q_ids_ref, kv_ids_ref, o_ref, lse_ref, *,
                cfg: Config, block_q, block_k):
    q_block = pl.program_id(2)
    q = q_ref[...]
    q_ids = None if q_ids_ref is None else q_ids_ref[...]
    lo, hi = base.kv_block_range(cfg, q_block, block_q, block_k)

    def body(j, carry):
        acc, m, l = carry
        k_slice = pl.ds(pl.multiple_of(j * block_k, block_k), block_k)
        s, _ = base.logits(cfg, q, k_ref[k_slice, :])
        mask = base.tile_keep_mask(cfg, q_block * block_q, j * block_k, block_q, block_k,
                                   *_tile_ids(q_ids, kv_ids_ref, k_slice))
        if mask is not None:
            s = jnp.where(mask, s, base.MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        p = jnp.exp(s - m_new[:, None])
        if mask is not None:
            # Zero masked entries explicitly: in an all-masked row s == m_new.
            p = jnp.where(mask, p, 0.0)
        alpha = jnp.exp(m - m_new)
        v = v_ref[k_slice, :]
        acc = acc * alpha[:, None] + base.matmul(p.astype(v.dtype), v)
        return acc, m_new, l * alpha + jnp.sum(p, axis=1)

    acc = jnp.zeros((block_q, q.shape[1]), jnp.float32)
    m = jnp.full((block_q,), base.MASK_VALUE, jnp.float32)
    l = jnp.zeros((block_q,), jnp.float32)
    acc, m, l = lax.fori_loop(lo, hi + 1, body, (acc, m, l))
    nonempty = l > 0.0
    safe_l = jnp.where(nonempty, l, 1.0)
    o_ref[...] = (acc / safe_l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(nonempty, m + jnp.log(safe_l), _EMPTY_ROW_LSE)


def _dq_kernel(q_ref, k_ref, v_ref, q_ids_ref, kv_ids_ref, do_ref, lse_ref,
               delta_ref, dq_ref, *, cfg: Config, block_q, block_k):
    q_block = pl.program_id(2)
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]
    q_ids = None if q_ids_ref is None else q_ids_ref[...]
    lo, hi = base.kv_block_range(cfg, q_block, block_q, block_k)

    def body(j, dq):
        k_slice = pl.ds(pl.multiple_of(j * block_k, block_k), block_k)
        k = k_ref[k_slice, :]
        mask = base.tile_keep_mask(cfg, q_block * block_q, j * block_k, block_q, block_k,
                                   *_tile_ids(q_ids, kv_ids_ref, k_slice))
        _, ds = base.probs_and_dlogits(cfg, q, k, do, v_ref[k_slice, :], lse, delta, mask)
        return dq + base.matmul(ds.astype(k.dtype), k)

    dq = lax.fori_loop(lo, hi + 1, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, q_ids_ref, kv_ids_ref, do_ref, lse_ref,
                delta_ref, dk_ref, dv_ref, *, cfg: Config, block_q, block_k):
    # q_ref/do_ref: [T, G, H] and lse_ref/delta_ref: [G, T] hold the G query heads
    # of this kv head; one loop runs over (head, q block) pairs.
    k_block = pl.program_id(2)
    group = q_ref.shape[1]
    k, v = k_ref[...], v_ref[...]
    kv_ids = None if kv_ids_ref is None else kv_ids_ref[...]
    lo, hi = base.q_block_range(cfg, k_block, block_q, block_k)
    span = hi - lo + 1

    def body(step, carry):
        dk, dv = carry
        g = lax.div(step, span)
        i = lo + lax.rem(step, span)
        q_slice = pl.ds(pl.multiple_of(i * block_q, block_q), block_q)
        q = q_ref[q_slice, g, :]
        do = do_ref[q_slice, g, :]
        ids = () if kv_ids is None else (q_ids_ref[q_slice][:, None], kv_ids[None, :])
        mask = base.tile_keep_mask(cfg, i * block_q, k_block * block_k, block_q, block_k, *ids)
        p, ds = base.probs_and_dlogits(cfg, q, k, do, v, lse_ref[g, q_slice][:, None],
                                       delta_ref[g, q_slice][:, None], mask)
        dv = dv + base.matmul_tn(p.astype(do.dtype), do)
        dk = dk + base.matmul_tn(ds.astype(q.dtype), q)
        return dk, dv

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, group * jnp.maximum(span, 0), body, (zeros, zeros))
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# ---------------------------------------------------------------------------
# pallas_call construction.
# ---------------------------------------------------------------------------


def cuda_lowering_device(device_kind: str = "NVIDIA H100", num_cores: int = 132):
    """Context manager that lets the Triton kernels lower for CUDA without a GPU.

    Lowering a Triton kernel needs the target's compute capability. With a GPU
    attached JAX reads it from the device; on a CPU host (AOT lowering, tests)
    newer JAX (>= 0.11) raises "No supported GPU devices found" unless an
    abstract GPU device is in scope, which this provides. Use it around
    `jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))`.
    """
    device = jax.sharding.AbstractDevice(
        device_kind=device_kind, num_cores=num_cores, platform="gpu")
    mesh = jax.sharding.AbstractMesh((1,), ("_gpu",), abstract_device=device)
    return jax.sharding.use_abstract_mesh(mesh)


def _tiles(cfg: Config, which):
    """(block_q, block_k) of one kernel: "fwd", "dq" or "dkv"."""
    b = cfg.blocks
    return {"fwd": (b.block_q, b.block_kv), "dq": (b.block_q_dq, b.block_kv_dq),
            "dkv": (b.block_q_dkv, b.block_kv_dkv)}[which]


def _triton_call(kernel, *, cfg: Config, which, grid, in_specs, out_specs, out_shape, head_dim):
    block_q, block_k = _tiles(cfg, which)
    num_warps = cfg.blocks.num_warps or (4 if head_dim <= 64 else 8)
    return pl.pallas_call(
        functools.partial(kernel, cfg=cfg, block_q=block_q, block_k=block_k),
        grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        interpret=cfg.interpret, name=f"flash_attention_gpu_{which}",
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=cfg.blocks.num_stages))


def _ids_spec(length, blocked):
    """Spec for a [B, len] segment-id array: tiled by grid axis 2, or whole."""
    if blocked:
        return pl.BlockSpec((None, length), lambda b, h, i: (b, i))
    return pl.BlockSpec((None, length), lambda b, h, i: (b, 0))


def _q_major_specs(cfg: Config, q, k, which):
    """Specs of the forward and dq calls (grid b, n, q block): q's (also do's and the
    output's), the per-row statistics', and the q, k, v, q_ids, kv_ids inputs'."""
    head_dim, kv_len = q.shape[3], k.shape[1]
    bq, _ = _tiles(cfg, which)
    q_spec = pl.BlockSpec((None, bq, None, head_dim), lambda b, n, i: (b, i, n, 0))
    row_spec = pl.BlockSpec((None, None, bq), lambda b, n, i: (b, n, i))
    kv_spec = pl.BlockSpec((None, kv_len, None, head_dim),
                           lambda b, n, i: (b, 0, lax.div(n, cfg.groups), 0))
    ids = ([None, None] if not cfg.has_segment_ids else
           [_ids_spec(bq, blocked=True), _ids_spec(kv_len, blocked=False)])
    return q_spec, row_spec, [q_spec, kv_spec, kv_spec, *ids]


def _fwd(cfg: Config, q, k, v, q_ids, kv_ids):
    batch, q_len, num_heads, head_dim = q.shape
    q_spec, row_spec, in_specs = _q_major_specs(cfg, q, k, "fwd")
    return _triton_call(
        _fwd_kernel, cfg=cfg, which="fwd", grid=(batch, num_heads, q_len // _tiles(cfg, "fwd")[0]),
        in_specs=in_specs, out_specs=[q_spec, row_spec],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((batch, num_heads, q_len), jnp.float32)],
        head_dim=head_dim,
    )(q, k, v, q_ids, kv_ids)


def _bwd_dq(cfg: Config, q, k, v, q_ids, kv_ids, do, lse, delta):
    batch, q_len, num_heads, head_dim = q.shape
    q_spec, row_spec, in_specs = _q_major_specs(cfg, q, k, "dq")
    return _triton_call(
        _dq_kernel, cfg=cfg, which="dq", grid=(batch, num_heads, q_len // _tiles(cfg, "dq")[0]),
        in_specs=in_specs + [q_spec, row_spec, row_spec], out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype), head_dim=head_dim,
    )(q, k, v, q_ids, kv_ids, do, lse, delta)


def _bwd_dkv(cfg: Config, q, k, v, q_ids, kv_ids, do, lse, delta):
    batch, q_len, _, head_dim = q.shape
    kv_len, num_kv_heads = k.shape[1], k.shape[2]
    group = cfg.groups
    _, bk = _tiles(cfg, "dkv")
    # A block of G consecutive q heads is exactly the group of kv head h.
    q_spec = pl.BlockSpec((None, q_len, group, head_dim), lambda b, h, j: (b, 0, h, 0))
    kv_spec = pl.BlockSpec((None, bk, None, head_dim), lambda b, h, j: (b, j, h, 0))
    row_spec = pl.BlockSpec((None, group, q_len), lambda b, h, j: (b, h, 0))
    ids = ([None, None] if q_ids is None else
           [_ids_spec(q_len, blocked=False), _ids_spec(bk, blocked=True)])
    return _triton_call(
        _dkv_kernel, cfg=cfg, which="dkv", grid=(batch, num_kv_heads, kv_len // bk),
        in_specs=[q_spec, kv_spec, kv_spec, *ids, q_spec, row_spec, row_spec],
        out_specs=[kv_spec, kv_spec],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        head_dim=head_dim,
    )(q, k, v, q_ids, kv_ids, do, lse, delta)


# ---------------------------------------------------------------------------
# custom_vjp over padded operands.
# ---------------------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg, q, k, v, q_ids, kv_ids, sinks):
    return _flash_fwd(cfg, q, k, v, q_ids, kv_ids, sinks)[0]


def _flash_fwd(cfg, q, k, v, q_ids, kv_ids, sinks):
    out, lse = _fwd(cfg, q, k, v, q_ids, kv_ids)  # lse: natural log [B, N, T]
    if sinks is not None:
        w_BNT, lse = base.apply_sinks(lse, sinks, base2=False)
        out = (out.astype(jnp.float32) * jnp.swapaxes(w_BNT, 1, 2)[..., None]).astype(out.dtype)
    return out, (q, k, v, q_ids, kv_ids, sinks, out, lse)


def _flash_bwd(cfg, residuals, do):
    q, k, v, q_ids, kv_ids, sinks, out, lse = residuals
    delta_BTN = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
    delta = jnp.transpose(delta_BTN, (0, 2, 1))
    dq = _bwd_dq(cfg, q, k, v, q_ids, kv_ids, do, lse, delta)
    dk, dv = _bwd_dkv(cfg, q, k, v, q_ids, kv_ids, do, lse, delta)
    dsinks = None if sinks is None else base.sinks_grad(sinks, lse, delta, base2=False)
    return dq, dk, dv, None, None, dsinks


_flash.defvjp(_flash_fwd, _flash_bwd)
