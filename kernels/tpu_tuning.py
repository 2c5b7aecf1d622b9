"""Block sizes, VMEM limits and cost estimates of the TPU kernels (kernels/tpu.py).

Block sizes come from a small table per TPU generation and head dim (`TABLE`). The
numbers are reasoned, not measured (no TPU was available when they were written):

* MXU shape: v4, v5e and v5p multiply 128x128 tiles, v6e 256x256 (jax's
  `pallas.tpu` TpuInfo, `mxu_column_size`). Every tile is a multiple of 128 rows;
  on v6e the kv compute sub-block is >= 512 so each logits matmul fills the wider
  MXU several times over.
* VMEM per core (same source): v4 16 MiB, v5p 64 MiB, v5e and v6e 128 MiB. A tile
  pair costs K/V (or Q) re-reads from HBM in inverse proportion to its size, and
  every grid step a fixed ~0.35 us of pipeline overhead, so tiles grow until the
  working set (`vmem_bytes`: double-buffered inputs and outputs, scratch, and the
  float32 [rows, keys] temporaries of one step) nears the VMEM budget.
* The forward computes [block_q, block_kv_compute] logits at a time, so its kv
  tile (one DMA) can be larger than its temporaries; the backward kernels keep
  ~5 float32 [rows, keys] temporaries, so their tiles stay smaller.
* head_dim > 128 doubles the bytes per row of every q/k/v/accumulator tile: the
  kv tiles are halved.

The scoped VMEM limit handed to Mosaic (`vmem_limit_bytes`) is twice the largest
working-set estimate of the three kernels, at least 16 MiB, at most 3/4 of the
core's VMEM (the rest is left to Mosaic's internal scratch and to the surrounding
XLA program). Unknown generations (lowering with no TPU device in sight, e.g. an
AOT compile without a mesh) get the v4 row and no explicit limit: it fits every
generation's default scoped VMEM. Every number is overridable per call through
`BlockSizes` (`flash_attention(..., block_sizes=...)`).

GQA head stacking (`BlockSizes.stack_gqa`): the forward and dq kernels take all G
query heads of one kv head in one grid step, as one [G * block_q, H] operand, so
each K/V tile is fetched once per group instead of once per query head (G times
less K/V traffic). Their row tiles and float32 [rows, keys] temporaries grow by G,
so the table's default stacks only where that fits half the core's VMEM, halving
block_q (and block_q_dq) as needed while G * block_q still exceeds the unstacked
block_q (otherwise stacking saves no K/V traffic and is left off).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from kernels import base

LANES = 128
SUBLANES = 8
MIB = 1 << 20

# Per-core VMEM (bytes) and MXU width, from jax's pallas.tpu TpuInfo for each chip.
VMEM_BYTES = {"v4": 16 * MIB, "v5e": 128 * MIB, "v5p": 64 * MIB, "v6e": 128 * MIB}
MXU = {"v4": 128, "v5e": 128, "v5p": 128, "v6e": 256}

# generation -> (head_dim <= 128 row, head_dim > 128 row); each row is
# (block_q, block_kv, block_kv_compute, block_q_dq, block_kv_dq, block_q_dkv, block_kv_dkv).
TABLE = {
    "v4": ((512, 1024, 512, 512, 512, 512, 512), (512, 512, 256, 256, 512, 256, 512)),
    "v5e": ((1024, 1024, 512, 512, 1024, 512, 1024), (1024, 512, 512, 512, 512, 512, 512)),
    "v5p": ((1024, 1024, 512, 512, 1024, 512, 1024), (512, 1024, 512, 512, 512, 512, 512)),
    "v6e": ((1024, 2048, 1024, 512, 1024, 1024, 1024), (1024, 1024, 512, 512, 1024, 512, 1024)),
}
DEFAULT_GENERATION = "v4"  # smallest VMEM: its tiles fit every generation


@dataclasses.dataclass(frozen=True)
class BlockSizes(base.BlockSizes):
    """Tile sizes of the TPU kernels (128 times a power of two), the forward's kv
    compute sub-block, the scoped VMEM limit for Mosaic (None: Mosaic's default) and
    GQA head stacking of the forward and dq kernels (None: decided per call by
    `resolved`, on when G > 1 and the stacked tiles fit the VMEM limit)."""
    block_kv_compute: int | None = None  # None: block_kv (no sub-blocks)
    vmem_limit_bytes: int | None = None
    stack_gqa: bool | None = None
    MIN_BLOCK: ClassVar[int] = LANES

    def __post_init__(self):
        super().__post_init__()
        c = self.block_kv_compute
        if c is not None and (c < LANES or c & (c - 1) or c > self.block_kv):
            raise ValueError(f"BlockSizes.block_kv_compute={c} must be a power of two >= {LANES} "
                             f"and <= block_kv ({self.block_kv})")

    @property
    def kv_compute(self) -> int:
        return self.block_kv if self.block_kv_compute is None else self.block_kv_compute

    def clipped(self, q_len: int, kv_len: int) -> BlockSizes:
        if self.block_kv_compute is None:
            return super().clipped(q_len, kv_len)
        clipped = dataclasses.replace(self, block_kv_compute=None).clipped(q_len, kv_len)
        return dataclasses.replace(clipped, block_kv_compute=min(self.block_kv_compute, clipped.block_kv))

    def heads_per_step(self, groups: int) -> int:
        """Query heads the forward and dq kernels take per grid step (G when stacked)."""
        return groups if self.stack_gqa else 1

    def resolved(self, groups: int, head_dim: int, dtype, interpret: bool) -> BlockSizes:
        """These sizes with `stack_gqa` decided when it is None: stacked when G > 1 and (on
        TPU) the stacked working set fits 3/4 of the VMEM limit (Mosaic's 16 MiB default
        when none is set)."""
        if self.stack_gqa is not None:
            return self
        stack = groups > 1
        if stack and not interpret:
            limit = self.vmem_limit_bytes or 16 * MIB
            stacked = dataclasses.replace(self, stack_gqa=True)
            stack = max(vmem_bytes(stacked, head_dim, dtype, groups=groups)) <= limit * 3 // 4
        return dataclasses.replace(self, stack_gqa=stack)

    @classmethod
    def for_platform(cls, platform: str, generation: str | None = None, head_dim: int = 128,
                     dtype="bfloat16", groups: int = 1) -> BlockSizes:
        """Defaults per lowering platform: the generation's table row on TPU; 128 elsewhere
        (interpret mode, where small tiles keep the serial grid loop cheap to trace), there
        stacked whenever G > 1. groups: G, query heads per kv head."""
        if platform != "tpu":
            return cls(*(LANES,) * 6, stack_gqa=groups > 1)
        row = TABLE.get(generation, TABLE[DEFAULT_GENERATION])[head_dim > 128]
        bq, bk, bkc, bq_dq, bk_dq, bq_dkv, bk_dkv = row
        blocks = cls(block_q=bq, block_kv=bk, block_kv_compute=bkc, block_q_dq=bq_dq, block_kv_dq=bk_dq,
                     block_q_dkv=bq_dkv, block_kv_dkv=bk_dkv, stack_gqa=False)
        if generation not in VMEM_BYTES:
            return blocks  # Mosaic's default scoped VMEM: no room for stacked tiles
        budget = VMEM_BYTES[generation] // 2  # the limit below: 1.5x to 2x the need
        shrink = 0
        while groups > 1 and groups * (bq >> shrink) > bq and bq >> shrink >= LANES:
            stacked = dataclasses.replace(blocks, block_q=bq >> shrink, block_q_dq=max(LANES, bq_dq >> shrink),
                                          stack_gqa=True)
            if max(vmem_bytes(stacked, head_dim, dtype, groups=groups)) <= budget:
                blocks = stacked
                break
            shrink += 1
        need = max(vmem_bytes(blocks, head_dim, dtype, groups=groups))
        limit = min(VMEM_BYTES[generation] * 3 // 4, max(16 * MIB, base.round_up(2 * need, MIB)))
        return dataclasses.replace(blocks, vmem_limit_bytes=limit)


def vmem_bytes(blocks: BlockSizes, head_dim: int, dtype, segment_ids: bool = True, groups: int = 1):
    """Estimated VMEM working set (bytes) of one grid step of the (fwd, dq, dkv) kernels:
    double-buffered input/output tiles, scratch, and float32 [rows, keys] temporaries;
    with `stack_gqa` the fwd and dq rows are those of all `groups` heads of a step."""
    item = jnp.dtype(dtype).itemsize
    H = base.round_up(head_dim, LANES) if head_dim != 64 else 64

    def rows(n, width=H, size=item):
        return n * width * size

    def stat(n):
        return SUBLANES * n * 4

    def ids(bq, bk):
        return 2 * (stat(bq) + stat(bk)) + rows(max(bq, bk), LANES, 4) if segment_ids else 0

    g = blocks.heads_per_step(groups)
    bq, bk, bkc = g * blocks.block_q, blocks.block_kv, blocks.kv_compute
    fwd = (2 * (rows(bq) + 2 * rows(bk)) + 2 * (rows(bq) + stat(bq))  # q, k, v in; o, lse out
           + 2 * rows(bq, LANES, 4) + rows(bq, size=4)  # m, l, acc
           + 4 * bq * bkc * 4 + ids(bq, bk))  # s, p, mask, exp temporaries
    bq, bk = g * blocks.block_q_dq, blocks.block_kv_dq
    dq = (2 * (2 * rows(bq) + 2 * rows(bk) + 2 * stat(bq)) + 2 * rows(bq)  # q, do, k, v, lse, delta; dq
          + rows(bq, size=4) + 2 * rows(bq, LANES, 4) + 5 * bq * bk * 4 + ids(bq, bk))
    bq, bk = blocks.block_q_dkv, blocks.block_kv_dkv
    dkv = (2 * (2 * rows(bq) + 2 * rows(bk) + 2 * stat(bq)) + 4 * rows(bk)  # ...; dk, dv
           + 2 * rows(bk, size=4) + 5 * bq * bk * 4 + ids(bq, bk))
    return fwd, dq, dkv


def device_generation() -> str | None:
    """The TPU generation ("v4", "v5e", "v5p", "v6e") being lowered for, read from the
    device kind of the mesh in context (AOT compiles for a topology under `jax.set_mesh`,
    and shard_map bodies), else of the default device when it is a TPU; None if unknown."""
    kind = None
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    if device is not None:
        kind = device.device_kind
    elif jax.default_backend() == "tpu":
        kind = jax.devices()[0].device_kind
    return generation_of(kind)


def generation_of(device_kind: str | None) -> str | None:
    kinds = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5e": "v5e", "TPU v5": "v5p", "TPU v5p": "v5p",
             "TPU v6 lite": "v6e", "TPU v6e": "v6e"}
    return kinds.get(device_kind)


# ----------------------------------------------------------------------------
# Cost estimates: counted over the blocks the kernels compute (skipped blocks cost nothing).


def kv_block_range(cfg: base.Config, qi, block_q: int, block_kv: int):
    """`base.kv_block_range` in numpy, for concrete q block indices (array or int):
    usable while tracing for any device, which jnp ops on constants are not."""
    qi = np.asarray(qi, np.int64)
    num_kv = -(-cfg.kv_len // block_kv)
    hi = np.full(qi.shape, num_kv - 1)
    lo = np.zeros(qi.shape, np.int64)
    if cfg.banded:
        last_pos = qi * block_q + (block_q - 1 + cfg.q_offset)
        hi = np.minimum(hi, np.where(last_pos < 0, -1, np.maximum(last_pos, 0) // block_kv))
    if cfg.sliding_window is not None:
        first_key = qi * block_q + (cfg.q_offset - cfg.sliding_window + 1)
        lo = np.minimum(np.maximum(first_key, 0) // block_kv, num_kv - 1)
    return lo, hi


def visited_blocks(cfg: base.Config, block_q: int, block_kv: int, num_q: int) -> int:
    """How many (q block, kv block) pairs of one head the kernels compute: those inside
    `base.kv_block_range` (the causal/window band), for q blocks 0..num_q-1."""
    lo, hi = kv_block_range(cfg, np.arange(num_q), block_q, block_kv)
    return int(np.maximum(hi - lo + 1, 0).sum())


def cost_estimates(cfg: base.Config, B: int, N: int, T_pad: int, S_pad: int, H: int, itemsize: int):
    """pl.CostEstimate of the (fwd, dq, dkv) calls on padded q [B, N, T_pad, H], k/v [B, K, S_pad, H].

    Flops follow the FlashAttention convention on the visited tiles: the forward
    2 matmuls (q.k, p.v: 4*bq*bk*H per tile), the backward the 5 matmuls of the
    attention gradient (q.k, do.v, dv, dk, dq: 10*bq*bk*H), booked as dq 2 (ds.k)
    and dk/dv 8. The split backward executes q.k and do.v once more in the dq
    kernel (4*bq*bk*H per tile); that recomputation is not counted, so that XLA's
    cost analysis of a step gives model flops (what MFU is measured against).
    Transcendentals count every exp (and the soft cap's tanh) actually evaluated;
    bytes count every HBM tile read or written, K/V once per visited tile and grid step
    (with `stack_gqa` a step serves the G query heads of a kv head). Tiles are
    those of the causal/window band (static); with segment ids the kernels' lists
    (kernels/tpu_grid.py) can be shorter, which a static estimate cannot know, so for
    packed batches it is an upper bound.
    """
    blocks = cfg.blocks
    heads = B * N
    steps = heads // blocks.heads_per_step(cfg.groups)  # (batch, head) steps of the fwd and dq grids
    cap = cfg.logits_soft_cap is not None
    rows_bytes = lambda n: n * H * itemsize

    bq, bkc = blocks.block_q, blocks.kv_compute
    tiles = heads * visited_blocks(cfg, bq, bkc, T_pad // bq)
    kv_fetched = steps * visited_blocks(cfg, bq, blocks.block_kv, T_pad // bq)
    fwd = pl.CostEstimate(
        flops=4 * tiles * bq * bkc * H,
        transcendentals=tiles * (bq * bkc * (1 + cap) + bq),
        bytes_accessed=heads * (2 * rows_bytes(T_pad) + T_pad * SUBLANES * 4)
        + kv_fetched * 2 * rows_bytes(blocks.block_kv))

    bq, bk = blocks.block_q_dq, blocks.block_kv_dq
    tiles = heads * visited_blocks(cfg, bq, bk, T_pad // bq)
    dq = pl.CostEstimate(
        flops=2 * tiles * bq * bk * H,
        transcendentals=tiles * bq * bk * (1 + cap),
        bytes_accessed=heads * (3 * rows_bytes(T_pad) + 2 * T_pad * SUBLANES * 4)
        + tiles // heads * steps * 2 * rows_bytes(bk))

    bq, bk = blocks.block_q_dkv, blocks.block_kv_dkv
    tiles = heads * visited_blocks(cfg, bq, bk, T_pad // bq)
    kv_heads = heads // cfg.groups
    dkv = pl.CostEstimate(
        flops=8 * tiles * bq * bk * H,
        transcendentals=tiles * bq * bk * (1 + cap),
        bytes_accessed=kv_heads * 4 * rows_bytes(S_pad)
        + tiles * (2 * rows_bytes(bq) + 2 * bq * SUBLANES * 4))
    return fwd, dq, dkv
