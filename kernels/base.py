"""What every attention implementation shares: the one validation of a call and the
static options it yields, block sizes, block ranges, the mask predicate and the
logits / gradient arithmetic of the flash kernels.

`validate` is the only place that checks a call's arguments; `kernels.attention`
and `reference_attention` run it once and hand every implementation already
normalised inputs: (q, k, v, q_ids, kv_ids, options).

Letter legend: B batch, T q length, S kv length, N q heads, K kv heads,
G = N // K q heads per kv head, H head dim.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

# Finite stand-in for -inf: exp() of differences stays NaN-free in rows where every key is masked.
MASK_VALUE = -1e30
LOG2_E = math.log2(math.e)
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b
_TN = (((0,), (0,)), ((), ()))  # a.T @ b


@dataclasses.dataclass(frozen=True)
class Options:
    """The validated, static options of one call; hashable (a custom_vjp nondiff arg)."""
    causal: bool
    scale: float
    sliding_window: int | None
    logits_soft_cap: float | None

    def keep_mask(self, q_pos, key_pos, q_ids=None, kv_ids=None):
        """Boolean keep-mask from broadcastable absolute positions and segment ids of the
        same rows/columns (either pair may be None); None when nothing is masked."""
        keep = None
        if self.causal or self.sliding_window is not None:
            keep = _both(keep, key_pos <= q_pos)
        if self.sliding_window is not None:
            keep = _both(keep, key_pos > q_pos - self.sliding_window)
        if q_ids is not None:
            keep = _both(keep, (q_ids == kv_ids) & (q_ids != 0))
        return keep


def _both(a, b):
    return b if a is None else a & b


def split_segment_ids(segment_ids, batch: int, q_len: int, kv_len: int):
    """Returns (q_ids [B, T], kv_ids [B, S]) int32, or (None, None); validates shapes."""
    if segment_ids is None:
        return None, None
    if isinstance(segment_ids, (tuple, list)):
        if len(segment_ids) != 2:
            raise ValueError("segment_ids must be one [batch, len] array or a "
                             f"(q_ids, kv_ids) pair; got a sequence of {len(segment_ids)}")
        q_ids, kv_ids = segment_ids
    else:
        if q_len != kv_len:
            raise ValueError(
                f"a single segment_ids array needs q_len == kv_len (got {q_len} and "
                f"{kv_len}); pass a (q_segment_ids, kv_segment_ids) pair instead")
        q_ids = kv_ids = segment_ids
    if tuple(q_ids.shape) != (batch, q_len):
        raise ValueError(f"q segment ids must have shape {(batch, q_len)}, got {q_ids.shape}")
    if tuple(kv_ids.shape) != (batch, kv_len):
        raise ValueError(f"kv segment ids must have shape {(batch, kv_len)}, got {kv_ids.shape}")
    for ids in (q_ids, kv_ids):
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"segment ids must be integers, got {ids.dtype}")
    return q_ids.astype(jnp.int32), kv_ids.astype(jnp.int32)


def validate(q, k, v, *, causal=False, segment_ids=None, scale=None, sliding_window=None,
             logits_soft_cap=None, bias=None):
    """Checks one call (arguments as in `kernels.attention`); returns (q_ids, kv_ids, Options).

    q_ids [B, T] / kv_ids [B, S] are int32 or both None; Options holds the resolved scale.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError("q, k, v must be [batch, len, heads, head_dim]; got shapes "
                         f"{q.shape}, {k.shape}, {v.shape}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k and v must agree in batch, length and heads: {k.shape} vs {v.shape}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"batch sizes differ: q {q.shape[0]}, k/v {k.shape[0]}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"head_dim differs: q {q.shape[3]}, k {k.shape[3]}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"kv heads ({k.shape[2]}) must divide heads ({q.shape[2]})")
    for x in (q, k, v):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"q, k, v must be floating point, got {x.dtype}")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if sliding_window is not None and int(sliding_window) < 1:
        raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
    if logits_soft_cap is not None and float(logits_soft_cap) <= 0:
        raise ValueError(f"logits_soft_cap must be > 0, got {logits_soft_cap}")
    if bias is not None:
        target = (q.shape[0], q.shape[2], q.shape[1], k.shape[1])
        try:
            jnp.broadcast_shapes(bias.shape, target)
        except ValueError:
            raise ValueError(f"bias shape {bias.shape} does not broadcast to [B, N, T, S] = "
                             f"{target}") from None
    q_ids, kv_ids = split_segment_ids(segment_ids, q.shape[0], q.shape[1], k.shape[1])
    options = Options(
        causal=bool(causal), scale=1.0 / math.sqrt(q.shape[3]) if scale is None else float(scale),
        sliding_window=None if sliding_window is None else int(sliding_window),
        logits_soft_cap=None if logits_soft_cap is None else float(logits_soft_cap))
    return q_ids, kv_ids, options


def validate_sinks(sinks, num_heads: int):
    """Checks `sinks` (None, or one float logit per query head, [N]); returns it or None."""
    if sinks is None:
        return None
    if getattr(sinks, "ndim", None) != 1 or sinks.shape[0] != num_heads:
        raise ValueError(f"sinks must be one logit per query head, shape ({num_heads},); "
                         f"got {getattr(sinks, 'shape', type(sinks))}")
    if not jnp.issubdtype(sinks.dtype, jnp.floating):
        raise ValueError(f"sinks must be floating point, got {sinks.dtype}")
    return sinks


# Attention sinks on a flash kernel's output: the sink s_n of query head n is one more logit
# with no value, so it only adds exp(s_n) to the softmax denominator. From a kernel's output
# o and row log-sum-exp lse over the kept keys: o' = o * w with w = exp(lse) / (exp(lse) +
# exp(s)), lse' = logaddexp(lse, s). The flash backward run on (o', lse', do) is then exactly
# the gradient of the sink attention in q, k, v (the sink column has no value, so
# delta = rowsum(do * o') is its softmax correction unchanged), and d/ds = -sum p_sink * delta.
# `base2`: the kernel keeps lse in base 2 (logits scaled by log2(e)).


def _sink_logits(sinks_N, base2: bool):
    return (sinks_N.astype(jnp.float32) * (LOG2_E if base2 else 1.0))[None, :, None]


def apply_sinks(lse_BNT, sinks_N, *, base2: bool):
    """(w [B, N, T], lse' [B, N, T]): the weight that scales each output row, and the row
    log-sum-exp with the sink (same base as lse)."""
    s = _sink_logits(sinks_N, base2)
    if base2:
        lse_new = jnp.logaddexp2(lse_BNT, s)
        return jnp.exp2(lse_BNT - lse_new), lse_new
    lse_new = jnp.logaddexp(lse_BNT, s)
    return jnp.exp(lse_BNT - lse_new), lse_new


def sinks_grad(sinks_N, lse_BNT, delta_BNT, *, base2: bool):
    """dL/d(sinks) [N] from lse' (with the sink) and delta = rowsum(do * o')."""
    s = _sink_logits(sinks_N, base2)
    p_sink = jnp.exp2(s - lse_BNT) if base2 else jnp.exp(s - lse_BNT)
    return (-jnp.sum(p_sink * delta_BNT, axis=(0, 2))).astype(sinks_N.dtype)


# ----------------------------------------------------------------------------
# Block sizes and the static configuration of one kernel call.


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes (rows of q / rows of k, v) of the forward, dq and dk/dv kernels.

    Each backend subclasses it with its defaults and its smallest tile `MIN_BLOCK`;
    every tile is MIN_BLOCK times a power of two, so the largest divides the others
    and one padded length serves all kernels. `clipped` shrinks tiles to the
    sequence lengths, so short inputs do not pay for big tiles.
    """
    block_q: int
    block_kv: int
    block_q_dq: int
    block_kv_dq: int
    block_q_dkv: int
    block_kv_dkv: int
    MIN_BLOCK: ClassVar[int] = 16
    Q_TILES: ClassVar[tuple[str, ...]] = ("block_q", "block_q_dq", "block_q_dkv")
    KV_TILES: ClassVar[tuple[str, ...]] = ("block_kv", "block_kv_dq", "block_kv_dkv")

    def __post_init__(self):
        for name in self.Q_TILES + self.KV_TILES:
            value = getattr(self, name)
            if value < self.MIN_BLOCK or value & (value - 1):
                raise ValueError(f"{type(self).__name__}.{name}={value} must be a power of two >= "
                                 f"{self.MIN_BLOCK} ({self.MIN_BLOCK} * 2**k)")

    def clipped(self, q_len: int, kv_len: int) -> BlockSizes:
        """Every tile cut to the smallest power of two (>= MIN_BLOCK) covering its length."""
        def clip(block, length):
            return min(block, max(self.MIN_BLOCK, pl.next_power_of_2(length)))
        return dataclasses.replace(
            self, **{n: clip(getattr(self, n), q_len) for n in self.Q_TILES},
            **{n: clip(getattr(self, n), kv_len) for n in self.KV_TILES})


@dataclasses.dataclass(frozen=True)
class Config(Options):
    """Static description of one kernel call on padded inputs; hashable."""
    q_len: int  # unpadded lengths; rows/keys beyond them are padding.
    kv_len: int
    groups: int  # G = N // K.
    has_segment_ids: bool
    kv_padded: bool  # the padded kv length exceeds kv_len
    blocks: BlockSizes  # already clipped to the lengths
    interpret: bool

    @property
    def q_offset(self) -> int:
        """Absolute position of query 0: queries are the last q_len positions."""
        return self.kv_len - self.q_len

    @property
    def banded(self) -> bool:
        return self.causal or self.sliding_window is not None

    def keep_mask(self, q_pos, key_pos, q_ids=None, kv_ids=None):
        """`Options.keep_mask`, also masking padded keys that no segment id 0 marks."""
        keep = super().keep_mask(q_pos, key_pos, q_ids, kv_ids)
        if q_ids is None and self.kv_padded:
            keep = _both(keep, key_pos < self.kv_len)
        return keep


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def configure(options: Options, q_shape, kv_shape, *, has_segment_ids: bool, blocks: BlockSizes,
              interpret: bool):
    """Config for q [B, T, N, H] and k/v [B, S, K, H], and the padded lengths (T_pad, S_pad).

    Tiles are clipped to the lengths; both lengths are padded to the largest tile of
    their axis, which every other tile of that axis divides.
    """
    (_, T, N, _), (_, S, K, _) = q_shape, kv_shape
    blocks = blocks.clipped(T, S)
    T_pad = round_up(T, max(getattr(blocks, n) for n in blocks.Q_TILES))
    S_pad = round_up(S, max(getattr(blocks, n) for n in blocks.KV_TILES))
    cfg = Config(**dataclasses.asdict(options), q_len=T, kv_len=S, groups=N // K,
                 has_segment_ids=has_segment_ids, kv_padded=S_pad != S, blocks=blocks,
                 interpret=bool(interpret))
    return cfg, T_pad, S_pad


def pad_segment_ids(q_ids, kv_ids, T_pad: int, S_pad: int):
    """Pads [B, T] / [B, S] ids to the padded lengths with id 0: masked like user padding."""
    return (jnp.pad(q_ids, ((0, 0), (0, T_pad - q_ids.shape[1]))),
            jnp.pad(kv_ids, ((0, 0), (0, S_pad - kv_ids.shape[1]))))


# ----------------------------------------------------------------------------
# Block ranges and masks, shared by the kernels (traced ints) and index maps.


def kv_block_range(cfg: Config, qi, block_q: int, block_kv: int):
    """[lo, hi] of kv blocks that q block qi may attend to (empty when hi < lo)."""
    num_kv = pl.cdiv(cfg.kv_len, block_kv)  # blocks past kv_len are all padding
    hi = jnp.int32(num_kv - 1)
    lo = jnp.int32(0)
    if cfg.banded:
        last_pos = qi * block_q + (block_q - 1 + cfg.q_offset)
        hi = jnp.minimum(hi, jnp.where(last_pos < 0, -1, lax.div(jnp.maximum(last_pos, 0), block_kv)))
    if cfg.sliding_window is not None:
        first_key = qi * block_q + (cfg.q_offset - cfg.sliding_window + 1)
        # Capped so that q blocks made only of padding rows still fetch a real block.
        lo = jnp.minimum(lax.div(jnp.maximum(first_key, 0), block_kv), num_kv - 1)
    return lo, hi


def q_block_range(cfg: Config, ki, block_q: int, block_kv: int):
    """[lo, hi] of q blocks that attend to kv block ki (empty when hi < lo)."""
    num_q = pl.cdiv(cfg.q_len, block_q)  # blocks past q_len are all padding
    hi = jnp.int32(num_q - 1)
    lo = jnp.int32(0)
    if cfg.banded:
        first_row = ki * block_kv - cfg.q_offset  # first row whose position >= key
        lo = jnp.minimum(lax.div(jnp.maximum(first_row, 0), block_q), num_q - 1)
    if cfg.sliding_window is not None:
        last_row = ki * block_kv + (block_kv - 1 - cfg.q_offset + cfg.sliding_window - 1)
        hi = jnp.minimum(hi, jnp.where(last_row < 0, -1, lax.div(jnp.maximum(last_row, 0), block_q)))
    return lo, hi


def tile_keep_mask(cfg: Config, q_start, key_start, block_q: int, block_kv: int, q_ids=None, kv_ids=None,
                   transposed=False):
    """Keep-mask of the [block_q, block_kv] tile ([block_kv, block_q] if transposed) whose first
    row/key are q_start/key_start, given its ids broadcastable against it; None if nothing is masked."""
    q_pos = key_pos = None
    if cfg.banded or (cfg.kv_padded and not cfg.has_segment_ids):
        shape, q_axis = ((block_kv, block_q), 1) if transposed else ((block_q, block_kv), 0)
        q_pos = q_start + cfg.q_offset + lax.broadcasted_iota(jnp.int32, shape, q_axis)
        key_pos = key_start + lax.broadcasted_iota(jnp.int32, shape, 1 - q_axis)
    return cfg.keep_mask(q_pos, key_pos, q_ids, kv_ids)


# ----------------------------------------------------------------------------
# Tile arithmetic of the flash kernels (plain jnp/lax ops, valid in every backend).


def matmul(a, b):
    """a @ b in float32."""
    return lax.dot_general(a, b, _NN, preferred_element_type=jnp.float32)


def matmul_nt(a, b):
    """a @ b.T in float32."""
    return lax.dot_general(a, b, _NT, preferred_element_type=jnp.float32)


def matmul_tn(a, b):
    """a.T @ b in float32."""
    return lax.dot_general(a, b, _TN, preferred_element_type=jnp.float32)


def logits(cfg: Options, a, b):
    """Scaled (and soft-capped) a @ b.T in float32, and the tanh for the backward."""
    s = matmul_nt(a, b) * cfg.scale
    if cfg.logits_soft_cap is None:
        return s, None
    t = jnp.tanh(s / cfg.logits_soft_cap)
    return cfg.logits_soft_cap * t, t


def probs_and_dlogits(cfg: Options, a, b, c, d, lse, delta, keep):
    """Recomputed probabilities p of logits a @ b.T and dL/d(q.k) for one tile, given
    dL/dp = c @ d.T. lse/delta broadcast against the tile (columns, or rows when the
    tile is transposed); keep is the tile's keep-mask or None."""
    s, t = logits(cfg, a, b)
    return _probs_and_dlogits(cfg, s, t, c, d, lse, delta, keep, jnp.exp)


def _probs_and_dlogits(cfg: Options, s, t, c, d, lse, delta, keep, exp):
    """The shared body: logits s (natural or base 2, with `exp` to match) and their tanh t."""
    if keep is not None:
        s = jnp.where(keep, s, MASK_VALUE)
    p = exp(s - lse)
    if keep is not None:
        p = jnp.where(keep, p, 0.0)
    ds = p * (matmul_nt(c, d) - delta)
    if t is not None:
        ds = ds * (1.0 - t * t)  # d/dx of c * tanh(x / c)
    return p, ds * cfg.scale


# Base-2 variants: q is multiplied once by `q_scale2(cfg)` = scale * log2(e), so a @ b.T
# of the pre-scaled operands is the scaled logit in base 2 and exp2 replaces exp; the
# logsumexp these functions take and the kernels keep is base 2 (natural = base-2 * ln 2).


def q_scale2(cfg: Options) -> float:
    """The factor folded into q: scale * log2(e)."""
    return cfg.scale * LOG2_E


def logits2(cfg: Options, a, b, prescaled: bool = True):
    """Base-2 scaled (and soft-capped) logits a @ b.T in float32, one operand pre-scaled by
    `q_scale2` (else, prescaled=False, the float32 product is multiplied by it), and the
    tanh for the backward. The cap c acts on the natural scaled logit x:
    log2(e) * c * tanh(x / c) = c2 * tanh(x2 / c2) with x2 = log2(e) * x, c2 = log2(e) * c."""
    s = matmul_nt(a, b)
    if not prescaled:
        s = s * q_scale2(cfg)
    if cfg.logits_soft_cap is None:
        return s, None
    cap2 = cfg.logits_soft_cap * LOG2_E
    t = jnp.tanh(s * (1.0 / cap2))
    return cap2 * t, t


def probs_and_dlogits2(cfg: Options, a, b, c, d, lse2, delta, keep, prescaled: bool = True):
    """`probs_and_dlogits` for pre-scaled operands (see `logits2`) and a base-2 lse:
    p = exp2(s2 - lse2) equals exp(s - lse); the returned dlogits are d/d(q.k) of the
    unscaled q and k, as there."""
    s, t = logits2(cfg, a, b, prescaled)
    return _probs_and_dlogits(cfg, s, t, c, d, lse2, delta, keep, jnp.exp2)


# ----------------------------------------------------------------------------
# Masked/unmasked split: only tiles that cross the causal diagonal, a window edge, the
# kv padding or a segment boundary evaluate the keep-mask; interior tiles skip it.


def tile_needs_mask(cfg: Config, q_start, key_start, block_q: int, block_kv: int, seg_ranges=None):
    """Whether the [block_q, block_kv] tile whose first row/key are q_start/key_start (traced
    or concrete ints) may hold a masked entry; False (static) when no tile can.

    seg_ranges: (q_min, q_max, kv_min, kv_max) segment ids of the tile's rows and keys, or
    None without segment ids. A tile is unmasked only if every row and key holds one and
    the same non-zero id (padding, id 0, is always masked) and it lies inside the band.
    """
    needs = False
    if cfg.banded:
        first_pos = q_start + cfg.q_offset
        needs = key_start + (block_kv - 1) > first_pos  # some key above the diagonal
        if cfg.sliding_window is not None:  # some key at or before the window's start
            needs = needs | (key_start <= first_pos + (block_q - 1) - cfg.sliding_window)
    if seg_ranges is not None:
        q_min, q_max, kv_min, kv_max = seg_ranges
        one_segment = (q_min == q_max) & (kv_min == kv_max) & (q_min == kv_min) & (q_min != 0)
        needs = needs | jnp.logical_not(one_segment)
    elif cfg.kv_padded:
        needs = needs | (key_start + (block_kv - 1) >= cfg.kv_len)
    return needs


def block_id_ranges(ids, block: int):
    """Per-block (min, max) of segment ids [B, L] (L a multiple of block), flattened to
    int32 [B * L // block] each (index b * (L // block) + i)."""
    blocks = ids.reshape(ids.shape[0], -1, block)
    return jnp.min(blocks, axis=-1).reshape(-1), jnp.max(blocks, axis=-1).reshape(-1)
