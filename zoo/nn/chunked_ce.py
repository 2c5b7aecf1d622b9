"""Cross-entropy over the vocabulary in blocks, with its own backward: never the [B, T, V] logits.

`vocab_stats(h, head, targets, vocab_block=C)` gives, per token, the float32 logsumexp of the
head's logits, the target's logit and the argmax, computed over blocks of C vocabulary columns
with an online logsumexp. Its backward (a custom_vjp) recomputes each block's logits and adds
that block's share of dh and dW. Weights, masking and the z-loss stay outside, in plain JAX, so
their gradients arrive here as the cotangents of lse and of the target logit.

Sharding. The vocabulary of W is split over the mesh axes of the logical "vocab" rule into P
contiguous shards of U = V / P rows. W is viewed as [P, U, D] (a free reshape that moves the
sharding onto P) and every block takes C columns from each shard, so each device works on its own
columns and the carries keep a P axis: nothing is reduced across devices inside the loops, only
once after them. Letters beyond zoo/nn's legend: P vocab shards, U rows per shard, C block width.

A ragged last block is not padded (that would copy W): it starts at U - C and masks the columns an
earlier block covered. Ties in the argmax go to the first index, as jnp.argmax's.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from zoo.nn.vocab_head import VocabHead
from zoo.sharding import constrain, logical_size

_CARRY = ("batch", "length", "activation_vocab")
_BLOCK = ("batch", "length", "activation_vocab", None)


class VocabStats(NamedTuple):
    lse: jax.Array           # [B, T] float32 logsumexp of the logits
    target_logit: jax.Array  # [B, T] float32 logit of the target
    argmax: jax.Array        # [B, T] int32 first index of the largest logit (no gradient)


def vocab_stats(h_BTD, head: VocabHead, targets_BT, *, vocab_block: int) -> VocabStats:
    """Per-token softmax statistics of head.logits(h_BTD), holding at most [B, T, P, C] logits
    at once in the forward and in the backward."""
    shards = logical_size("vocab")
    if head.vocab_size % shards:
        shards = 1
    return _stats(h_BTD, head, targets_BT.astype(jnp.int32), vocab_block, shards)


class _Geometry(NamedTuple):
    shards: int  # P
    rows: int    # U
    width: int   # C
    blocks: int  # number of blocks


def _geometry(head, vocab_block, shards) -> _Geometry:
    rows = head.vocab_size // shards
    width = max(1, min(vocab_block, rows))
    return _Geometry(shards, rows, width, -(-rows // width))


def _views(head, g: _Geometry):
    """W as [P, U, D] ("VD") or [D, P, U] ("DV"), the bias as [P, U]: reshapes, no copies."""
    if head.layout == "VD":
        w = constrain(head.weight.reshape(g.shards, g.rows, -1), ("vocab", None, "embed"))
    else:
        w = constrain(head.weight.reshape(-1, g.shards, g.rows), ("embed", "vocab", None))
    b = None if head.bias is None else head.bias.reshape(g.shards, g.rows)
    return w, b


def _block(head, g: _Geometry, hc_BTD, w, b, i):
    """Block i: its start column in each shard, the weight slice, which of its C columns are its
    own (the last block of a ragged split overlaps the one before), each column's global id, and
    the float32 (capped) logits [B, T, P, C], masked columns -inf."""
    start = jnp.minimum(i * g.width, g.rows - g.width)
    cols_C = start + jnp.arange(g.width, dtype=jnp.int32)
    own_C = cols_C >= i * g.width
    ids_PC = jnp.arange(g.shards, dtype=jnp.int32)[:, None] * g.rows + cols_C
    if head.layout == "VD":
        w_blk = lax.dynamic_slice_in_dim(w, start, g.width, axis=1)
        raw = jnp.einsum("BTD,PCD->BTPC", hc_BTD, w_blk.astype(head.dtype))
    else:
        w_blk = lax.dynamic_slice_in_dim(w, start, g.width, axis=2)
        raw = jnp.einsum("BTD,DPC->BTPC", hc_BTD, w_blk.astype(head.dtype))
    if b is not None:
        raw = raw + lax.dynamic_slice_in_dim(b, start, g.width, axis=1).astype(head.dtype)
    z = constrain(head.cap(raw.astype(head.logit_dtype)), _BLOCK)
    return start, own_C, ids_PC, w_blk, jnp.where(own_C, z, -jnp.inf)


def _forward(h_BTD, head, targets_BT, vocab_block, shards):
    g = _geometry(head, vocab_block, shards)
    hc_BTD = h_BTD.astype(head.dtype)
    w, b = _views(head, g)

    def body(i, carry):
        m, s, tgt, best, arg = carry
        start, own_C, ids_PC, _, z = _block(head, g, hc_BTD, w, b, i)
        block_max = jnp.max(z, axis=-1)
        new_m = jnp.maximum(m, block_max)
        s = s * jnp.exp(m - new_m) + jnp.sum(jnp.exp(z - new_m[..., None]), axis=-1)
        hit = (ids_PC == targets_BT[..., None, None]) & own_C
        tgt = tgt + jnp.sum(jnp.where(hit, z, 0.0), axis=-1)
        better = block_max > best  # strict: an earlier block keeps a tie
        arg = jnp.where(better, ids_PC[:, 0] + jnp.argmax(z, axis=-1).astype(jnp.int32), arg)
        return tuple(constrain(x, _CARRY) for x in (new_m, s, tgt, jnp.maximum(best, block_max), arg))

    shape, acc = (*targets_BT.shape, g.shards), head.logit_dtype
    init = (jnp.full(shape, -jnp.inf, acc), jnp.zeros(shape, acc), jnp.zeros(shape, acc),
            jnp.full(shape, -jnp.inf, acc), jnp.zeros(shape, jnp.int32))
    m, s, tgt, best, arg = lax.fori_loop(0, g.blocks, body, tuple(constrain(x, _CARRY) for x in init))
    top = jnp.max(m, axis=-1)
    lse = top + jnp.log(jnp.sum(s * jnp.exp(m - top[..., None]), axis=-1))
    first = jnp.argmax(best, axis=-1)  # the first shard holding the largest logit
    argmax = jnp.take_along_axis(arg, first[..., None], axis=-1)[..., 0]
    return VocabStats(lse, jnp.sum(tgt, axis=-1), argmax), (h_BTD, head, targets_BT, lse)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _stats(h_BTD, head, targets_BT, vocab_block, shards):
    return _forward(h_BTD, head, targets_BT, vocab_block, shards)[0]


def _backward(vocab_block, shards, residuals, cotangents):
    h_BTD, head, targets_BT, lse_BT = residuals
    acc = head.logit_dtype
    d_lse, d_tgt = cotangents.lse.astype(acc), cotangents.target_logit.astype(acc)
    g = _geometry(head, vocab_block, shards)
    hc_BTD = h_BTD.astype(head.dtype)
    w, b = _views(head, g)
    spec_w = ("vocab", None, "embed") if head.layout == "VD" else ("embed", "vocab", None)

    def body(i, carry):
        dh_PBTD, dw, db = carry
        start, own_C, ids_PC, w_blk, z = _block(head, g, hc_BTD, w, b, i)
        hit = ids_PC == targets_BT[..., None, None]
        dz = d_lse[..., None, None] * jnp.exp(z - lse_BT[..., None, None]) + jnp.where(hit, d_tgt[..., None, None], 0.0)
        if head.softcap is not None:  # d/dr c*tanh(r/c) = 1 - tanh^2 = (1 - t)(1 + t), t = z / c
            t = jnp.where(own_C, z, 0.0) / head.softcap
            dz = dz * ((1.0 - t) * (1.0 + t))
        dz = constrain(jnp.where(own_C, dz, 0.0), _BLOCK)
        draw = dz.astype(head.dtype)
        # dh keeps float32 across blocks (one rounding at the end, as one unblocked matmul has).
        if head.layout == "VD":
            dh_PBTD = dh_PBTD + jnp.einsum("BTPC,PCD->PBTD", draw, w_blk.astype(head.dtype), preferred_element_type=acc)
            dw_blk = jnp.einsum("BTPC,BTD->PCD", draw, hc_BTD).astype(acc)
            axis = 1
        else:
            dh_PBTD = dh_PBTD + jnp.einsum("BTPC,DPC->PBTD", draw, w_blk.astype(head.dtype), preferred_element_type=acc)
            dw_blk = jnp.einsum("BTPC,BTD->DPC", draw, hc_BTD).astype(acc)
            axis = 2
        # Overlapped columns of a ragged last block add exact zeros.
        dw = lax.dynamic_update_slice_in_dim(dw, lax.dynamic_slice_in_dim(dw, start, g.width, axis) + dw_blk,
                                             start, axis)
        if db is not None:
            db_blk = jnp.sum(dz, axis=(0, 1))
            db = lax.dynamic_update_slice_in_dim(db, lax.dynamic_slice_in_dim(db, start, g.width, 1) + db_blk,
                                                 start, 1)
        return (constrain(dh_PBTD, ("activation_vocab", "batch", "length", "activation_embed")),
                constrain(dw, spec_w), db)

    init = (jnp.zeros((g.shards, *h_BTD.shape), acc), constrain(jnp.zeros(w.shape, acc), spec_w),
            None if b is None else jnp.zeros(b.shape, acc))
    dh_PBTD, dw, db = lax.fori_loop(0, g.blocks, body, init)
    dh = jnp.sum(dh_PBTD, axis=0).astype(h_BTD.dtype)
    d_head = head.replace(weight=dw.reshape(head.weight.shape).astype(head.weight.dtype),
                          bias=None if db is None else db.reshape(head.bias.shape).astype(head.bias.dtype))
    return dh, d_head, None


_stats.defvjp(_forward, _backward)
