"""Flash attention for Hopper and newer NVIDIA GPUs (sm90+): Pallas kernels on the Mosaic GPU backend.

  gpu_mosaic.py      this file: what is served, padding, the custom_vjp (the entry point)
  gpu_mosaic_fwd.py  shared kernel helpers and the forward kernel (TMA producer warpgroup + 2 compute
                     warpgroups, wgmma, exp2 with scale * log2(e) folded into q, base-2 LSE)
  gpu_mosaic_bwd.py  the dq and dk/dv kernels (same pipeline; GQA without repeating K/V)

Semantics are those of `kernels.reference_attention` (causal with the last query aligned to the last
key, segment ids with 0 = padding, GQA/MQA, sliding window, soft cap, scale); a row with nothing to
attend to gives zeros, never NaN. Only blocks that the causal mask / window allow are visited, and
only the blocks crossing the diagonal, the window edge, the kv padding or (with segment ids) any
block pay for a mask.

Served calls (anything else raises NotImplementedError; nothing falls back silently):
  - q, k, v in bfloat16 or float16: wgmma takes 16-bit operands (float32 would run as TF32 on the
    tensor cores, below the float32 contract).
  - head_dim a multiple of 16 in [64, 256] (`HEAD_DIMS`), never padded: shared-memory tiles take the
    largest swizzle that divides a row (128 B for 64/128/192/256, 64 B for 96, 32 B for 80/112/...).
    Head dims above 128 use one compute warpgroup in the backward kernels so the tiles fit in SMEM.
  - jax >= 0.12 (the Mosaic GPU Pallas API this is written against). On older jax the module still
    imports; a call raises.
Sequence lengths are padded to the tiles (multiples of 128 rows / keys); padded keys are masked.

Testing without a GPU (jax 0.12.0.1, CPU-only jaxlib, checked on the development machine):
  - GPU interpret mode (`interpret=True` here: `plgpu.InterpretGPUParams()`) runs these kernels on
    CPU, simulating shared memory, warpgroups, barriers and TMA; tests/kernels/test_gpu_mosaic.py
    checks their numerics against the float32 reference that way. Two interpreter gaps shape the
    code: it does not simulate `pl.run_state` (so wgmma accumulators are fresh per matmul and running
    sums are added in registers), and its wgmma reads operands only from shared memory (so in
    interpret mode, and only there, the P / dS tiles are staged through SMEM; compiled kernels feed
    them to wgmma from registers, see `gpu_mosaic_fwd.operand`).
  - Lowering for CUDA from a CPU host works: `jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))`
    runs the whole Pallas -> Mosaic GPU lowering (layout inference, wgmma operand/transform checks,
    the shared-memory budget: e.g. head_dim 320 fails with "exceeds available shared memory") and
    emits a `stablehlo.custom_call @mosaic_gpu_v2` carrying the kernel module; with no GPU device the
    target is sm90 (mosaic_gpu's `_infer_arch` falls back to (9, 0)). Compiling further (PTX/SASS by
    ptxas) is done by the CUDA jaxlib plugin at `.compile()`, which a CPU-only install lacks
    ("device_assignment cannot be None during compilation"), so register allocation and ptxas are
    only checked on a real GPU (tests marked `gpu`).

Letter legend: B batch, T q length, S kv length, N q heads, K kv heads, G = N // K, H head dim.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp

from kernels import base, gpu_mosaic_bwd, gpu_mosaic_fwd
from kernels.gpu_mosaic_fwd import AVAILABLE, COMPUTE_WGS, EMPTY_ROW_LSE, LOG2E, q_factor

DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
HEAD_DIMS = tuple(range(64, 257, 16))
MIN_COMPUTE_CAPABILITY = (9, 0)

__all__ = ["AVAILABLE", "BlockSizes", "DTYPES", "HEAD_DIMS", "check_call", "check_device", "flash_attention",
           "flash_attention_with_lse", "local_compute_capability"]


@dataclasses.dataclass(frozen=True)
class BlockSizes(base.BlockSizes):
    """Tiles of the Mosaic GPU kernels: rows per compute warpgroup (block_q*, the wgmma M of 64) and
    keys per pipeline step (block_kv*); `stages` slots in each shared-memory ring."""
    stages: int = 2
    MIN_BLOCK: ClassVar[int] = 64

    @classmethod
    def for_head_dim(cls, head_dim: int) -> BlockSizes:
        kv = 128 if head_dim <= 128 else 64
        return cls(block_q=64, block_kv=kv, block_q_dq=64, block_kv_dq=kv if head_dim <= 128 else 64,
                   block_q_dkv=64, block_kv_dkv=64)

    def __post_init__(self):
        super().__post_init__()
        if self.stages < 1:
            raise ValueError(f"stages must be >= 1, got {self.stages}")


def check_call(q, k):
    """Raise NotImplementedError for a call these kernels do not serve (see the module docstring)."""
    if not AVAILABLE:
        raise NotImplementedError(
            f"the Mosaic GPU attention kernel needs jax >= 0.12 (installed: {jax.__version__}); "
            "use implementation='pallas_triton', 'cudnn' or 'xla' (the model config's attention_impl)")
    if jnp.dtype(q.dtype) not in DTYPES:
        raise NotImplementedError(
            f"the Mosaic GPU attention kernel takes bfloat16 or float16 (wgmma operands), got {q.dtype}; "
            "cast the inputs, or use implementation='xla'")
    if q.shape[3] not in HEAD_DIMS:
        raise NotImplementedError(
            f"the Mosaic GPU attention kernel serves head_dim a multiple of 16 in [64, 256], got {q.shape[3]}; "
            "use implementation='cudnn' or 'xla'")


def local_compute_capability():
    """(major, minor) of the first local CUDA device, or None when this host has none (lowering
    ahead of time from a CPU host: Mosaic GPU then lowers for sm90)."""
    try:
        devices = jax.devices("cuda")
    except RuntimeError:
        return None
    capability = getattr(devices[0], "compute_capability", None) if devices else None
    return None if capability is None else tuple(int(x) for x in str(capability).split(".")[:2])


def check_device():
    """Raise NotImplementedError when the local CUDA device is older than Hopper (sm90)."""
    capability = local_compute_capability()
    if capability is not None and capability < MIN_COMPUTE_CAPABILITY:
        raise NotImplementedError(
            f"the Mosaic GPU attention kernel needs sm90+ (Hopper or newer); this GPU is "
            f"sm{capability[0]}{capability[1]}: use implementation='pallas_triton' or 'xla'")


def prepare(q, k, v, q_ids, kv_ids, options: base.Options, block_sizes, interpret):
    """Checks the call; returns (cfg, q * q_factor, k, v, q_ids, kv_ids), all padded to the tiles."""
    check_call(q, k)
    blocks = block_sizes or BlockSizes.for_head_dim(q.shape[3])
    cfg, _, _ = base.configure(options, q.shape, k.shape, has_segment_ids=q_ids is not None,
                               blocks=blocks, interpret=interpret)
    b, wgs = cfg.blocks, gpu_mosaic_bwd.backward_wgs(q.shape[3])
    q_pad = base.round_up(q.shape[1], max(COMPUTE_WGS * b.block_q, wgs * b.block_q_dq, b.block_q_dkv))
    kv_pad = base.round_up(k.shape[1], max(b.block_kv, b.block_kv_dq, wgs * b.block_kv_dkv))
    cfg = dataclasses.replace(cfg, kv_padded=kv_pad != k.shape[1])

    def pad(x, length):
        return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0)))

    if q_ids is not None:
        q_ids, kv_ids = base.pad_segment_ids(q_ids, kv_ids, q_pad, kv_pad)
    q = (q.astype(jnp.float32) * q_factor(options)).astype(q.dtype)
    return cfg, pad(q, q_pad), pad(k, kv_pad), pad(v, kv_pad), q_ids, kv_ids


def flash_attention(q, k, v, q_ids, kv_ids, options: base.Options, *,
                    block_sizes: BlockSizes | None = None, interpret=False, sinks=None):
    """Fused attention on the Mosaic GPU backend, differentiable in q, k, v (and sinks).

    Args:
      q: [B, T, N, H]; k, v: [B, S, K, H] with K dividing N (never repeated in memory).
      q_ids, kv_ids, options: as `kernels.base.validate` returns them.
      block_sizes: `BlockSizes`; default `BlockSizes.for_head_dim(H)`.
      interpret: True runs the kernels in GPU interpret mode on CPU (jax >= 0.12); or an
        `InterpretGPUParams`.
      sinks: float [N] or None: per-head sink logits (`kernels.base.apply_sinks`).

    Returns:
      [B, T, N, H] in q's dtype; rows with nothing to attend to are zeros.
    """
    cfg, q_s, k, v, q_ids, kv_ids = prepare(q, k, v, q_ids, kv_ids, options, block_sizes, interpret)
    return _flash(cfg, q_s, k, v, q_ids, kv_ids, sinks)[:, :cfg.q_len]


def flash_attention_with_lse(q, k, v, q_ids, kv_ids, options: base.Options, *,
                             block_sizes: BlockSizes | None = None, interpret=False):
    """The forward kernel alone: (out [B, T, N, H], natural-log logsumexp [B, N, T] float32). Rows with
    nothing to attend to give zeros and an lse of 1e30. Not differentiable (see `flash_attention`)."""
    cfg, q, k, v, q_ids, kv_ids = prepare(q, k, v, q_ids, kv_ids, options, block_sizes, interpret)
    out, lse2 = gpu_mosaic_fwd.forward(cfg, q, k, v, q_ids, kv_ids)
    lse = jnp.where(lse2 >= EMPTY_ROW_LSE, lse2, lse2 / LOG2E)
    return out[:, :cfg.q_len], lse[:, :, :cfg.q_len]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg, q, k, v, q_ids, kv_ids, sinks):
    return _flash_fwd(cfg, q, k, v, q_ids, kv_ids, sinks)[0]


def _flash_fwd(cfg, q, k, v, q_ids, kv_ids, sinks):
    out, lse = gpu_mosaic_fwd.forward(cfg, q, k, v, q_ids, kv_ids)  # lse: base 2 [B, N, T]
    if sinks is not None:
        w_BNT, lse = base.apply_sinks(lse, sinks, base2=True)
        out = (out.astype(jnp.float32) * jnp.swapaxes(w_BNT, 1, 2)[..., None]).astype(out.dtype)
    return out, (q, k, v, q_ids, kv_ids, sinks, out, lse)


def _flash_bwd(cfg, residuals, do):
    # q is the q_factor-scaled q, and dq is the gradient with respect to it.
    q, k, v, q_ids, kv_ids, sinks, out, lse = residuals
    do = do.astype(q.dtype)
    delta = jnp.einsum("bqhd,bqhd->bhq", out.astype(jnp.float32), do.astype(jnp.float32))
    dq = gpu_mosaic_bwd.dq(cfg, q, k, v, q_ids, kv_ids, do, lse, delta)
    dk, dv = gpu_mosaic_bwd.dkv(cfg, q, k, v, q_ids, kv_ids, do, lse, delta)
    dsinks = None if sinks is None else base.sinks_grad(sinks, lse, delta, base2=True)
    return dq, dk, dv, None, None, dsinks


_flash.defvjp(_flash_fwd, _flash_bwd)
