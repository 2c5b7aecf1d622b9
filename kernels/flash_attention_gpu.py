"""Flash attention for NVIDIA GPUs: Pallas kernels on the Triton backend.

Forward (online softmax, logsumexp residual) and backward (one kernel for dq,
one for dk/dv) under a `jax.custom_vjp`. The semantics are those of
`kernels.reference_attention`; see the Contracts section of DESIGN.md.

Layout of this file, so that a Mosaic GPU version can sit beside it:
  * backend-neutral: block sizes, padding, the mask and the block-range
    arithmetic, the three kernel bodies (they use only `pl` and `jnp` ops);
  * Triton-specific: `_triton_call` (the one place naming Triton compiler
    params) and the BlockSpecs the calls use, which rely on Triton's
    "a block is a strided view" model (whole-sequence K/V blocks cost nothing).

Letter legend: B batch, T q length, S kv length, N q heads, K kv heads,
G = N // K q heads per kv head, H head dim.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels.reference import split_segment_ids

# Finite stand-ins for -inf/+inf: exp() of differences of these stays NaN-free
# in rows where every key is masked.
_MASK_VALUE = -1e30
_EMPTY_ROW_LSE = 1e30
_MIN_BLOCK = 16  # Triton's tensor-core dot needs every dim >= 16.
_MAX_HEAD_DIM = 256


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes and launch parameters of the GPU kernels.

  Defaults target H100 with bf16 and head_dim <= 128; `for_head_dim` halves the
  tiles for head_dim 256 so a q tile, two K/V stages and the accumulator fit in
  shared memory/registers. Blocks are clipped to the (power-of-two rounded)
  sequence lengths, so small inputs do not pay for big tiles.
  """
  block_q: int = 128
  block_k: int = 64
  block_q_dq: int = 64
  block_k_dq: int = 64
  block_q_dkv: int = 64
  block_k_dkv: int = 64
  num_warps: int | None = None  # None: 4 for head_dim <= 64, else 8.
  num_stages: int = 2

  def __post_init__(self):
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      if f.name.startswith("block_") and (
          value < _MIN_BLOCK or value & (value - 1)):
        raise ValueError(
            f"BlockSizes.{f.name}={value} must be a power of two >= {_MIN_BLOCK}")

  @classmethod
  def for_head_dim(cls, head_dim: int) -> "BlockSizes":
    """Default tiles for a (padded) head dim."""
    if head_dim > 128:
      return cls(block_q=64, block_k=32, block_q_dq=32, block_k_dq=32,
                 block_q_dkv=32, block_k_dkv=32)
    return cls()


@dataclasses.dataclass(frozen=True)
class _Config:
  """Static description of one call; hashable, so it is a custom_vjp nondiff arg."""
  scale: float
  causal: bool
  sliding_window: int | None
  logits_soft_cap: float | None
  q_offset: int  # absolute position of query 0: kv_len - q_len.
  kv_len: int  # unpadded kv length; keys at or beyond it are padding.
  num_kv_heads: int
  blocks: BlockSizes
  interpret: bool


def flash_attention_gpu(q, k, v, *, causal=False, segment_ids=None, scale=None,
                        sliding_window=None, logits_soft_cap=None, bias=None,
                        block_sizes=None, interpret=False):
  """Fused attention on the Pallas Triton backend, differentiable in q, k, v.

  Args:
    q: [B, T, N, H]; k, v: [B, S, K, H] with K dividing N. Query head n reads kv
      head n // (N // K); K/V are never repeated in memory.
    causal: mask keys after the query; with T != S the last query is aligned
      with the last key.
    segment_ids: int32 [B, T] (needs T == S) or a (q_ids [B, T], kv_ids [B, S])
      pair. Tokens attend within their id; id 0 is padding and attends nowhere.
    scale: logit scale, default 1/sqrt(H).
    sliding_window: W; query at position i sees keys j with i - W < j <= i.
    logits_soft_cap: c; scaled logits x become c * tanh(x / c).
    bias: not supported by this kernel (raises).
    block_sizes: `BlockSizes`; default `BlockSizes.for_head_dim(H)`.
    interpret: run the kernels in Pallas interpret mode (CPU testing).

  Returns:
    [B, T, N, H] in q's dtype. Rows with nothing to attend to are zeros.
  """
  if bias is not None:
    raise NotImplementedError(
        "flash_attention_gpu does not support an additive bias; use "
        "implementation='xla' for biased attention (e.g. T5 relative positions).")
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"expected 4-D q, k, v; got {q.shape}, {k.shape}, {v.shape}")
  batch, q_len, num_heads, head_dim = q.shape
  _, kv_len, num_kv_heads, _ = k.shape
  if k.shape != v.shape or k.shape[0] != batch or k.shape[3] != head_dim:
    raise ValueError(f"incompatible shapes q={q.shape} k={k.shape} v={v.shape}")
  if num_heads % num_kv_heads:
    raise ValueError(f"kv heads ({num_kv_heads}) must divide heads ({num_heads})")
  if head_dim > _MAX_HEAD_DIM:
    raise ValueError(f"head_dim {head_dim} > {_MAX_HEAD_DIM} is not supported")
  if sliding_window is not None and sliding_window < 1:
    raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
  if logits_soft_cap is not None and logits_soft_cap <= 0:
    raise ValueError(f"logits_soft_cap must be > 0, got {logits_soft_cap}")
  if scale is None:
    scale = 1.0 / math.sqrt(head_dim)

  q_ids, kv_ids = split_segment_ids(segment_ids, batch, q_len, kv_len)

  # Zero-padding the head dim is exact (zeros add nothing to q.k and give zero
  # output columns, sliced off below) and gives Triton power-of-two tiles.
  head_pad = max(_MIN_BLOCK, pl.next_power_of_2(head_dim))
  blocks = block_sizes or BlockSizes.for_head_dim(head_pad)
  # One padding quantum per axis, shared by all kernels, so the forward's
  # residuals fit the backward's grids.
  q_quantum = max(_clip_block(b, q_len) for b in
                  (blocks.block_q, blocks.block_q_dq, blocks.block_q_dkv))
  k_quantum = max(_clip_block(b, kv_len) for b in
                  (blocks.block_k, blocks.block_k_dq, blocks.block_k_dkv))
  q_pad = _round_up(q_len, q_quantum)
  kv_pad = _round_up(kv_len, k_quantum)

  def pad(x, length):
    return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0),
                       (0, head_pad - head_dim)))

  if q_ids is not None:
    # Padded rows/keys get id 0 and so are masked like user padding.
    q_ids = jnp.pad(q_ids, ((0, 0), (0, q_pad - q_len)))
    kv_ids = jnp.pad(kv_ids, ((0, 0), (0, kv_pad - kv_len)))

  config = _Config(
      scale=float(scale), causal=bool(causal),
      sliding_window=None if sliding_window is None else int(sliding_window),
      logits_soft_cap=None if logits_soft_cap is None else float(logits_soft_cap),
      q_offset=kv_len - q_len, kv_len=kv_len, num_kv_heads=num_kv_heads,
      blocks=blocks, interpret=bool(interpret))
  out = _flash(config, pad(q, q_pad), pad(k, kv_pad), pad(v, kv_pad), q_ids,
               kv_ids)
  return out[:, :q_len, :, :head_dim]


def _round_up(x, m):
  return -(-x // m) * m


def _clip_block(block, length):
  return min(block, max(_MIN_BLOCK, pl.next_power_of_2(length)))


# ---------------------------------------------------------------------------
# Backend-neutral pieces: masks, block ranges, kernel bodies.
# ---------------------------------------------------------------------------

def _kv_block_range(cfg, q_block, block_q, block_k, num_k_blocks):
  """[lo, hi) of the kv blocks a q block can see; others are never visited."""
  lo, hi = 0, num_k_blocks
  first_q = q_block * block_q + cfg.q_offset
  last_q = first_q + block_q - 1
  if cfg.causal or cfg.sliding_window is not None:
    # Keys after the block's last query are masked for every row.
    hi = jnp.clip(lax.div(jnp.maximum(last_q, -1) + 1 + block_k - 1, block_k),
                  0, num_k_blocks)
  if cfg.sliding_window is not None:
    # Keys at or before first_q - W are masked for every row.
    first_key = jnp.maximum(first_q - cfg.sliding_window + 1, 0)
    lo = jnp.minimum(lax.div(first_key, block_k), num_k_blocks)
  return lo, hi


def _q_block_range(cfg, k_block, block_q, block_k, num_q_blocks):
  """[lo, hi) of the q blocks that can see a kv block (transpose of above)."""
  lo, hi = 0, num_q_blocks
  first_k = k_block * block_k
  last_k = first_k + block_k - 1
  if cfg.causal or cfg.sliding_window is not None:
    # Query index i sees key j only if i + q_offset >= j.
    first_i = jnp.maximum(first_k - cfg.q_offset, 0)
    lo = jnp.minimum(lax.div(first_i, block_q), num_q_blocks)
  if cfg.sliding_window is not None:
    # ... and only if i + q_offset < j + W.
    last_i = last_k + cfg.sliding_window - 1 - cfg.q_offset
    hi = jnp.clip(lax.div(jnp.maximum(last_i, -1) + 1 + block_q - 1, block_q),
                  0, num_q_blocks)
  return lo, hi


def _mask(cfg, q_start, k_start, block_q, block_k, q_ids, kv_ids, kv_padded):
  """[block_q, block_k] bool: True where the query may attend to the key."""
  q_pos = (q_start + cfg.q_offset
           + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0))
  k_pos = k_start + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
  mask = None

  def conj(a, b):
    return b if a is None else jnp.logical_and(a, b)

  if cfg.causal or cfg.sliding_window is not None:
    mask = conj(mask, q_pos >= k_pos)
  if cfg.sliding_window is not None:
    mask = conj(mask, k_pos > q_pos - cfg.sliding_window)
  if q_ids is not None:
    mask = conj(mask, (q_ids[:, None] == kv_ids[None, :]) & (q_ids[:, None] != 0))
  elif kv_padded:
    mask = conj(mask, k_pos < cfg.kv_len)
  return mask


def _logits(cfg, q, k):
  """Scaled (and soft-capped) q.k^T in float32; also returns tanh for the vjp."""
  s = lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                      preferred_element_type=jnp.float32) * cfg.scale
  if cfg.logits_soft_cap is None:
    return s, None
  t = jnp.tanh(s / cfg.logits_soft_cap)
  return cfg.logits_soft_cap * t, t


def _mm(a, b):
  return lax.dot_general(a, b, (((1,), (0,)), ((), ())),
                         preferred_element_type=jnp.float32)


def _mm_tn(a, b):
  """a^T @ b."""
  return lax.dot_general(a, b, (((0,), (0,)), ((), ())),
                         preferred_element_type=jnp.float32)


def _fwd_kernel(q_ref, k_ref, v_ref, q_ids_ref, kv_ids_ref, o_ref, lse_ref, *,
                cfg, block_q, block_k, kv_padded):
  q_block = pl.program_id(2)
  num_k_blocks = k_ref.shape[0] // block_k
  q = q_ref[...]
  q_ids = None if q_ids_ref is None else q_ids_ref[...]
  lo, hi = _kv_block_range(cfg, q_block, block_q, block_k, num_k_blocks)

  def body(j, carry):
    acc, m, l = carry
    k_slice = pl.ds(pl.multiple_of(j * block_k, block_k), block_k)
    s, _ = _logits(cfg, q, k_ref[k_slice, :])
    mask = _mask(cfg, q_block * block_q, j * block_k, block_q, block_k, q_ids,
                 None if kv_ids_ref is None else kv_ids_ref[k_slice], kv_padded)
    if mask is not None:
      s = jnp.where(mask, s, _MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    p = jnp.exp(s - m_new[:, None])
    if mask is not None:
      # Zero masked entries explicitly: in an all-masked row s == m_new.
      p = jnp.where(mask, p, 0.0)
    alpha = jnp.exp(m - m_new)
    v = v_ref[k_slice, :]
    acc = acc * alpha[:, None] + _mm(p.astype(v.dtype), v)
    return acc, m_new, l * alpha + jnp.sum(p, axis=1)

  acc = jnp.zeros((block_q, q.shape[1]), jnp.float32)
  m = jnp.full((block_q,), _MASK_VALUE, jnp.float32)
  l = jnp.zeros((block_q,), jnp.float32)
  acc, m, l = lax.fori_loop(lo, hi, body, (acc, m, l))
  nonempty = l > 0.0
  safe_l = jnp.where(nonempty, l, 1.0)
  o_ref[...] = (acc / safe_l[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(nonempty, m + jnp.log(safe_l), _EMPTY_ROW_LSE)


def _probs_and_dlogits(cfg, q, k, v, do, lse, delta, mask):
  """Recomputed probabilities p and dL/d(scaled raw logits) for one tile."""
  s, tanh = _logits(cfg, q, k)
  p = jnp.exp(s - lse[:, None])
  if mask is not None:
    p = jnp.where(mask, p, 0.0)
  dp = lax.dot_general(do, v, (((1,), (1,)), ((), ())),
                       preferred_element_type=jnp.float32)
  ds = p * (dp - delta[:, None])
  if tanh is not None:
    ds = ds * (1.0 - tanh * tanh)
  return p, ds


def _dq_kernel(q_ref, k_ref, v_ref, q_ids_ref, kv_ids_ref, do_ref, lse_ref,
               delta_ref, dq_ref, *, cfg, block_q, block_k, kv_padded):
  q_block = pl.program_id(2)
  num_k_blocks = k_ref.shape[0] // block_k
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]
  q_ids = None if q_ids_ref is None else q_ids_ref[...]
  lo, hi = _kv_block_range(cfg, q_block, block_q, block_k, num_k_blocks)

  def body(j, dq):
    k_slice = pl.ds(pl.multiple_of(j * block_k, block_k), block_k)
    k = k_ref[k_slice, :]
    mask = _mask(cfg, q_block * block_q, j * block_k, block_q, block_k, q_ids,
                 None if kv_ids_ref is None else kv_ids_ref[k_slice], kv_padded)
    _, ds = _probs_and_dlogits(cfg, q, k, v_ref[k_slice, :], do, lse, delta,
                               mask)
    return dq + _mm(ds.astype(k.dtype), k)

  dq = lax.fori_loop(lo, hi, body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, q_ids_ref, kv_ids_ref, do_ref, lse_ref,
                delta_ref, dk_ref, dv_ref, *, cfg, block_q, block_k, kv_padded):
  # q_ref/do_ref: [T, G, H] and lse_ref/delta_ref: [G, T] hold the G query heads
  # of this kv head; one loop runs over (head, q block) pairs.
  k_block = pl.program_id(2)
  num_q_blocks = q_ref.shape[0] // block_q
  group = q_ref.shape[1]
  k, v = k_ref[...], v_ref[...]
  kv_ids = None if kv_ids_ref is None else kv_ids_ref[...]
  lo, hi = _q_block_range(cfg, k_block, block_q, block_k, num_q_blocks)
  span = hi - lo

  def body(step, carry):
    dk, dv = carry
    g = lax.div(step, span)
    i = lo + lax.rem(step, span)
    q_slice = pl.ds(pl.multiple_of(i * block_q, block_q), block_q)
    q = q_ref[q_slice, g, :]
    do = do_ref[q_slice, g, :]
    mask = _mask(cfg, i * block_q, k_block * block_k, block_q, block_k,
                 None if q_ids_ref is None else q_ids_ref[q_slice], kv_ids,
                 kv_padded)
    p, ds = _probs_and_dlogits(cfg, q, k, v, do, lse_ref[g, q_slice],
                               delta_ref[g, q_slice], mask)
    dv = dv + _mm_tn(p.astype(do.dtype), do)
    dk = dk + _mm_tn(ds.astype(q.dtype), q)
    return dk, dv

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(0, group * jnp.maximum(span, 0), body, (zeros, zeros))
  dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


# ---------------------------------------------------------------------------
# Triton-specific: pallas_call construction.
# ---------------------------------------------------------------------------

_TritonParams = getattr(plgpu, "CompilerParams", None) or getattr(
    plgpu, "TritonCompilerParams")


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


def _triton_call(kernel, *, cfg, grid, in_specs, out_specs, out_shape, name,
                 head_dim):
  num_warps = cfg.blocks.num_warps or (4 if head_dim <= 64 else 8)
  return pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs, out_specs=out_specs,
      out_shape=out_shape, interpret=cfg.interpret, name=name,
      compiler_params=_TritonParams(num_warps=num_warps,
                                    num_stages=cfg.blocks.num_stages))


def _blocks(cfg, q_len, kv_len, which):
  b = cfg.blocks
  bq, bk = {"fwd": (b.block_q, b.block_k), "dq": (b.block_q_dq, b.block_k_dq),
            "dkv": (b.block_q_dkv, b.block_k_dkv)}[which]
  return _clip_block(bq, q_len), _clip_block(bk, kv_len)


def _ids_spec(length, blocked):
  """Spec for a [B, len] segment-id array: tiled by grid axis 2, or whole."""
  if blocked:
    return pl.BlockSpec((None, length), lambda b, h, i: (b, i))
  return pl.BlockSpec((None, length), lambda b, h, i: (b, 0))


def _fwd(cfg, q, k, v, q_ids, kv_ids):
  batch, q_len, num_heads, head_dim = q.shape
  kv_len = k.shape[1]
  group = num_heads // cfg.num_kv_heads
  bq, bk = _blocks(cfg, q_len, kv_len, "fwd")
  q_spec = pl.BlockSpec((None, bq, None, head_dim), lambda b, n, i: (b, i, n, 0))
  kv_spec = pl.BlockSpec((None, kv_len, None, head_dim),
                         lambda b, n, i: (b, 0, lax.div(n, group), 0))
  ids = ([None, None] if q_ids is None else
         [_ids_spec(bq, blocked=True), _ids_spec(kv_len, blocked=False)])
  kernel = functools.partial(_fwd_kernel, cfg=cfg, block_q=bq, block_k=bk,
                             kv_padded=kv_len != cfg.kv_len)
  return _triton_call(
      kernel, cfg=cfg, grid=(batch, num_heads, q_len // bq),
      in_specs=[q_spec, kv_spec, kv_spec, *ids],
      out_specs=[q_spec,
                 pl.BlockSpec((None, None, bq), lambda b, n, i: (b, n, i))],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((batch, num_heads, q_len), jnp.float32)],
      name="flash_attention_gpu_fwd", head_dim=head_dim,
  )(q, k, v, q_ids, kv_ids)


def _bwd_dq(cfg, q, k, v, q_ids, kv_ids, do, lse, delta):
  batch, q_len, num_heads, head_dim = q.shape
  kv_len = k.shape[1]
  group = num_heads // cfg.num_kv_heads
  bq, bk = _blocks(cfg, q_len, kv_len, "dq")
  q_spec = pl.BlockSpec((None, bq, None, head_dim), lambda b, n, i: (b, i, n, 0))
  kv_spec = pl.BlockSpec((None, kv_len, None, head_dim),
                         lambda b, n, i: (b, 0, lax.div(n, group), 0))
  row_spec = pl.BlockSpec((None, None, bq), lambda b, n, i: (b, n, i))
  ids = ([None, None] if q_ids is None else
         [_ids_spec(bq, blocked=True), _ids_spec(kv_len, blocked=False)])
  kernel = functools.partial(_dq_kernel, cfg=cfg, block_q=bq, block_k=bk,
                             kv_padded=kv_len != cfg.kv_len)
  return _triton_call(
      kernel, cfg=cfg, grid=(batch, num_heads, q_len // bq),
      in_specs=[q_spec, kv_spec, kv_spec, *ids, q_spec, row_spec, row_spec],
      out_specs=q_spec, out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      name="flash_attention_gpu_dq", head_dim=head_dim,
  )(q, k, v, q_ids, kv_ids, do, lse, delta)


def _bwd_dkv(cfg, q, k, v, q_ids, kv_ids, do, lse, delta):
  batch, q_len, num_heads, head_dim = q.shape
  kv_len = k.shape[1]
  num_kv_heads = cfg.num_kv_heads
  group = num_heads // num_kv_heads
  bq, bk = _blocks(cfg, q_len, kv_len, "dkv")
  # A block of G consecutive q heads is exactly the group of kv head h.
  q_spec = pl.BlockSpec((None, q_len, group, head_dim),
                        lambda b, h, j: (b, 0, h, 0))
  kv_spec = pl.BlockSpec((None, bk, None, head_dim), lambda b, h, j: (b, j, h, 0))
  row_spec = pl.BlockSpec((None, group, q_len), lambda b, h, j: (b, h, 0))
  ids = ([None, None] if q_ids is None else
         [_ids_spec(q_len, blocked=False), _ids_spec(bk, blocked=True)])
  kernel = functools.partial(_dkv_kernel, cfg=cfg, block_q=bq, block_k=bk,
                             kv_padded=kv_len != cfg.kv_len)
  return _triton_call(
      kernel, cfg=cfg, grid=(batch, num_kv_heads, kv_len // bk),
      in_specs=[q_spec, kv_spec, kv_spec, *ids, q_spec, row_spec, row_spec],
      out_specs=[kv_spec, kv_spec],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(v.shape, v.dtype)],
      name="flash_attention_gpu_dkv", head_dim=head_dim,
  )(q, k, v, q_ids, kv_ids, do, lse, delta)


# ---------------------------------------------------------------------------
# custom_vjp over padded operands.
# ---------------------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg, q, k, v, q_ids, kv_ids):
  return _fwd(cfg, q, k, v, q_ids, kv_ids)[0]


def _flash_fwd(cfg, q, k, v, q_ids, kv_ids):
  out, lse = _fwd(cfg, q, k, v, q_ids, kv_ids)
  return out, (q, k, v, q_ids, kv_ids, out, lse)


def _flash_bwd(cfg, residuals, do):
  q, k, v, q_ids, kv_ids, out, lse = residuals
  delta_BTN = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
  delta = jnp.transpose(delta_BTN, (0, 2, 1))
  dq = _bwd_dq(cfg, q, k, v, q_ids, kv_ids, do, lse, delta)
  dk, dv = _bwd_dkv(cfg, q, k, v, q_ids, kv_ids, do, lse, delta)
  return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
