"""Context parallelism: attention over rows whose length is sharded over mesh axes.

Layout. With n length shards, a row of L tokens is cut into 2n chunks of C = L / (2n); shard r
holds chunk r followed by chunk 2n - 1 - r (the zig-zag order of `zigzag_order`). Under a causal
mask every shard then does the same work: its early chunk sees few keys and its late chunk many.
The caller puts rows in that order (`zoo.nn.context` does it inside the training step, after the
next-token targets are taken in natural order).

Variants, called per shard inside `kernels.sharding.sharded`'s shard_map:
  "allgather"  k, v (and kv segment ids) are all-gathered and put back in natural order; each of
               the shard's two query chunks runs one kernel call on the keys it can see, a static
               slice chosen by a `lax.switch` on the shard index, so the kernels' masks stay as
               they are (queries are the last T of S keys).
  "ring"       k/v blocks travel around the ring with `ppermute` (n - 1 hops); each step runs the
               kernel on the blocks that the causal mask keeps (two C x C squares, no mask but
               segment ids), and blocks are merged by their log-sum-exp. The next block's transfer
               does not depend on the step's kernels, so XLA can overlap it with them.
Sliding windows with W - 1 <= C take the halo shortcut in both variants: each chunk needs only the
last W - 1 keys of the chunk before it, which two `ppermute`s of W - 1 rows bring. Longer windows
use all-gather's static slices (which skip keys outside the window); ring refuses them.

Gradients come from autodiff: ppermute and all_gather transpose to the reverse collectives, and the
per-shard kernels are differentiable (the log-sum-exp one in both outputs).

Letter legend: B batch, L local rows (2C), N q heads, K kv heads, H head dim.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from jax import lax

from kernels import base


def zigzag_order(length: int, shards: int) -> np.ndarray:
    """int32 [length]: the natural index of the token at each position of the zig-zag layout.
    2 * shards chunks of length // (2 * shards); shard r holds chunk r then chunk 2 * shards - 1 - r."""
    if length % (2 * shards):
        raise ValueError(f"context parallelism over {shards} shards needs the length ({length}) to divide "
                         f"by 2 x {shards} (zig-zag chunks)")
    chunk = length // (2 * shards)
    chunks = [c for r in range(shards) for c in (r, 2 * shards - 1 - r)]
    return np.concatenate([np.arange(c * chunk, (c + 1) * chunk) for c in chunks]).astype(np.int32)


def _natural_chunks(x, n: int):
    """Rows of an all-gathered zig-zag array (axis 1; chunks 0, 2n-1, 1, 2n-2, ...) in natural order."""
    slot = [2 * c if c < n else 2 * (2 * n - 1 - c) + 1 for c in range(2 * n)]
    x_BXC = x.reshape(x.shape[0], 2 * n, x.shape[1] // (2 * n), *x.shape[2:])
    return x_BXC[:, np.asarray(slot)].reshape(x.shape)


@dataclasses.dataclass(frozen=True)
class Plan:
    """The static description of one context-parallel call (per shard)."""
    kind: str  # "allgather" or "ring"
    axes: tuple[str, ...]  # the mesh axes that shard the length
    shards: int
    options: base.Options
    chunk: int  # C = length / (2 x shards)

    @property
    def halo(self) -> bool:
        """The window is short enough (W - 1 <= C) for the neighbour-halo shortcut."""
        return self.options.sliding_window is not None and self.options.sliding_window - 1 <= self.chunk


def plan(kind: str, axes, shards: int, options: base.Options, q_len: int, kv_len: int) -> Plan:
    """Checks one call and returns its Plan (ValueError, one line, for what cannot run)."""
    if q_len != kv_len:
        raise ValueError(f"context parallelism needs q_len == kv_len, got {q_len} and {kv_len}")
    if q_len % (2 * shards):
        raise ValueError(f"context parallelism over {shards} shards needs the length ({q_len}) to divide by "
                         f"2 x {shards} (zig-zag chunks)")
    chunk = q_len // (2 * shards)
    window = options.sliding_window
    if kind == "ring" and window is not None and window - 1 > chunk:
        raise ValueError(f"ring context parallelism needs sliding_window - 1 ({window - 1}) <= the chunk length "
                         f"length / (2 x shards) = {chunk}; use context_parallel='allgather' or more shards")
    return Plan(kind, tuple(axes), shards, options, chunk=chunk)


def attend(p: Plan, kernel, lse_kernel, q, k, v, q_ids, kv_ids, sinks):
    """Attention of one shard's zig-zag rows. kernel(q, k, v, q_ids, kv_ids, sinks) is the
    differentiable per-shard attention; lse_kernel(q, k, v, q_ids, kv_ids, options) returns
    (out, natural lse [B, T, N]) and is differentiable in both."""
    if p.halo:
        return _halo(p, kernel, q, k, v, q_ids, kv_ids, sinks)
    if p.kind == "ring":
        return _ring(p, lse_kernel, q, k, v, q_ids, kv_ids, sinks)
    return _allgather(p, kernel, q, k, v, q_ids, kv_ids, sinks)


def _allgather(p: Plan, kernel, q, k, v, q_ids, kv_ids, sinks):
    n, C, opts = p.shards, p.chunk, p.options
    gather = lambda x: _natural_chunks(lax.all_gather(x, p.axes, axis=1, tiled=True), n)
    k_n, v_n = gather(k), gather(v)
    ids_n = None if kv_ids is None else gather(kv_ids)
    if not (opts.causal or opts.sliding_window is not None):  # every key: one call on the gathered rows
        return kernel(q, k_n, v_n, q_ids, ids_n, sinks)

    def branch(r, q, k_n, v_n, q_ids, ids_n):
        outs = []
        for rows, c in ((slice(0, C), r), (slice(C, 2 * C), 2 * n - 1 - r)):
            hi = (c + 1) * C  # queries of chunk c are the last C of keys [lo, hi): the mask stays last-aligned
            lo = 0 if opts.sliding_window is None else max(0, c * C - opts.sliding_window + 1)
            ids = (None, None) if q_ids is None else (q_ids[:, rows], ids_n[:, lo:hi])
            outs.append(kernel(q[:, rows], k_n[:, lo:hi], v_n[:, lo:hi], *ids, sinks))
        return jnp.concatenate(outs, axis=1)

    branches = [lambda *a, r=r: branch(r, *a) for r in range(n)]
    return lax.switch(lax.axis_index(p.axes), branches, q, k_n, v_n, q_ids, ids_n)


def _shift(x, axes, n: int, up: bool):
    """x from shard r - 1 (up) or r + 1 (not up); zeros where there is none."""
    perm = [(i, i + 1) for i in range(n - 1)] if up else [(i + 1, i) for i in range(n - 1)]
    return lax.ppermute(x, axes, perm)


def _halo(p: Plan, kernel, q, k, v, q_ids, kv_ids, sinks):
    """Windowed attention (W - 1 <= C): each chunk's keys plus the last W - 1 keys before it."""
    n, C, W = p.shards, p.chunk, p.options.sliding_window
    if W == 1:  # a token sees only itself: each chunk alone
        ids = lambda rows: (None, None) if q_ids is None else (q_ids[:, rows], kv_ids[:, rows])
        return jnp.concatenate([kernel(q[:, rows], k[:, rows], v[:, rows], *ids(rows), sinks)
                                for rows in (slice(0, C), slice(C, 2 * C))], axis=1)
    h = W - 1
    if q_ids is None:  # ids mark the keys a missing neighbour leaves empty (id 0 is padding)
        q_ids = kv_ids = jnp.ones(q.shape[:2], jnp.int32)
    r = lax.axis_index(p.axes)
    early_tail, late_tail = slice(C - h, C), slice(2 * C - h, 2 * C)
    # The early chunk r follows chunk r - 1: shard r - 1's early chunk.
    # The late chunk 2n-1-r follows chunk 2n-2-r: shard r + 1's late chunk, or for r = n - 1 the own early chunk.
    halos = []
    for x in (k, v, kv_ids):
        before_early = _shift(x[:, early_tail], p.axes, n, up=True)
        before_late = jnp.where(r == n - 1, x[:, early_tail], _shift(x[:, late_tail], p.axes, n, up=False))
        halos.append((before_early, before_late))
    outs = []
    for i, rows in enumerate((slice(0, C), slice(C, 2 * C))):
        keys = [jnp.concatenate([halo[i], x[:, rows]], axis=1) for halo, x in zip(halos, (k, v, kv_ids))]
        outs.append(kernel(q[:, rows], keys[0], keys[1], q_ids[:, rows], keys[2], sinks))
    return jnp.concatenate(outs, axis=1)


def _merge(o_a, l_a, o_b, l_b):
    """Two partial attentions of the same rows over disjoint keys, combined by their (natural)
    log-sum-exp: out [B, T, N, H] float32, lse [B, T, N]. Rows empty in both stay out 0."""
    m = lax.stop_gradient(jnp.maximum(l_a, l_b))
    w_a, w_b = jnp.exp(l_a - m), jnp.exp(l_b - m)
    total = w_a + w_b
    out = (o_a * w_a[..., None] + o_b * w_b[..., None]) / total[..., None]
    return out, m + jnp.log(total)


def _ring(p: Plan, lse_kernel, q, k, v, q_ids, kv_ids, sinks):
    n, C, opts = p.shards, p.chunk, p.options
    causal = opts.causal
    full = dataclasses.replace(opts, causal=False, sliding_window=None)
    r = lax.axis_index(p.axes)

    def run(q_rows, kv_rows, block, options):
        """The block's kernel on query rows / key rows (slicers), float32 out and natural lse."""
        bk, bv, b_ids = block
        ids = (None, None) if q_ids is None else (q_rows(q_ids), kv_rows(b_ids))
        o, lse = lse_kernel(q_rows(q), kv_rows(bk), kv_rows(bv), *ids, options)
        return o.astype(jnp.float32), lse

    whole = lambda x: x
    # Step 0: the shard's own block. Its rows are [chunk r; chunk 2n-1-r] with r < 2n-1-r, so a plain
    # causal call on the local rows is exact.
    block = (k, v, kv_ids)
    out, lse = run(whole, whole, block, opts)
    for step in range(1, n):
        block = lax.ppermute(block, p.axes, [(i, (i + 1) % n) for i in range(n)])  # from shard (r - step) % n
        if not causal:  # every key: the whole block
            out, lse = _merge(out, lse, *run(whole, whole, block, full))
            continue
        j = (r - step) % n
        # The late query chunk (2n-1-r >= n > j) sees the block's early chunk j whole.
        late, early = (lambda x: x[:, C:]), (lambda x: x[:, :C])
        o_m, l_m = _merge(late(out), late(lse), *run(late, early, block, full))
        out = jnp.concatenate([early(out), o_m], axis=1)
        lse = jnp.concatenate([early(lse), l_m], axis=1)
        # A second square: early queries x early keys when the block comes from before (j < r);
        # late queries x late keys when it comes from after (j > r). Both start at row `at`.
        at = jnp.where(j < r, 0, C)
        rows = lambda x: lax.dynamic_slice_in_dim(x, at, C, axis=1)
        o_m, l_m = _merge(rows(out), rows(lse), *run(rows, rows, block, full))
        out = lax.dynamic_update_slice_in_dim(out, o_m, at, axis=1)
        lse = lax.dynamic_update_slice_in_dim(lse, l_m, at, axis=1)
    if sinks is not None:
        w_BNT, _ = base.apply_sinks(jnp.swapaxes(lse, 1, 2), sinks, base2=False)
        out = out * jnp.swapaxes(w_BNT, 1, 2)[..., None]
    return out.astype(q.dtype)
