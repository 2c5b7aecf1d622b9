"""The compacted grids of the TPU kernels (kernels/tpu_grid.py): the tile lists the kernels
walk, counted without running a kernel."""

import jax.numpy as jnp
import numpy as np
import pytest

from kernels import base, tpu, tpu_grid

from kernel_utils import segments


def _cfg(L, causal=False, window=None, ids=False):
    options = base.Options(causal=causal, scale=1.0, sliding_window=window, logits_soft_cap=None)
    return base.Config(**vars(options), q_len=L, kv_len=L, groups=1, has_segment_ids=ids, kv_padded=False,
                       blocks=tpu.BlockSizes.for_platform("tpu"), interpret=False)


def _steps(cfg, L, b, seg_ranges=None):
    *_, flags, _ = tpu_grid.q_major_lists(cfg, b, b, L // b, L // b, seg_ranges)
    return tpu_grid.executed_steps(flags)


def test_causal_8k_visits_only_the_lower_triangle():
    L, b = 8192, 512
    n = L // b
    assert _steps(_cfg(L), L, b) == n * n
    assert _steps(_cfg(L, causal=True), L, b) == n * (n + 1) // 2  # 136 of 256
    *_, flags, steps = tpu_grid.kv_major_lists(_cfg(L, causal=True), b, b, n, n, groups=2)
    assert tpu_grid.executed_steps(flags) == steps == 2 * n * (n + 1) // 2


def test_window_4k_at_32k_visits_about_the_band():
    L, b, W = 32768, 512, 4096
    n = L // b
    steps = _steps(_cfg(L, causal=True, window=W), L, b)
    band = n * (W // b + 1)  # each q block: its diagonal block and the W // b blocks before it
    assert steps <= band and steps >= band - (W // b + 1) ** 2  # the first rows see fewer blocks
    assert steps < 0.15 * n * n  # vs ~half for causal alone


def test_packed_batch_visits_only_blocks_inside_documents():
    L, b = 4096, 128
    n = L // b
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(2):  # 2 rows of 32 documents each (64 documents), then padding
        lengths = rng.integers(16, 120, size=32)
        rows.append(tuple(int(x) for x in lengths))
    ids = segments(rows, L)
    ranges = tpu_grid.block_ranges(ids, b)
    for causal in (False, True):
        cfg = _cfg(L, causal=causal, ids=True)
        q_block, kv_block, flags, steps = tpu_grid.q_major_lists(cfg, b, b, n, n, (ranges, ranges))
        q_block, kv_block, flags = (np.asarray(x).reshape(2, steps) for x in (q_block, kv_block, flags))
        ids_np = np.asarray(ids)
        for row in range(2):
            # Brute force: tiles holding a (row, key) pair of one document, inside the band.
            blocks = ids_np[row].reshape(n, b)
            want = set()
            for qi in range(n):
                for ki in range(n):
                    shared = np.intersect1d(blocks[qi], blocks[ki])
                    if (shared > 0).any() and (not causal or ki <= qi):
                        want.add((qi, ki))
            valid = (flags[row] & tpu_grid.VALID) != 0
            got = set(zip(q_block[row][valid].tolist(), kv_block[row][valid].tolist()))
            assert got == want, (row, causal)
            # Every q block is started and finished exactly once, in one run.
            assert ((flags[row] & tpu_grid.FIRST) != 0).sum() == n
            assert ((flags[row] & tpu_grid.LAST) != 0).sum() == n
        assert tpu_grid.executed_steps(flags) < 0.1 * 2 * n * n  # documents fill ~1/30 of each row


@pytest.mark.parametrize("causal, window", [(False, None), (True, None), (True, 300)])
def test_kv_major_lists_cover_the_transposed_band_per_head(causal, window):
    L, bq, bk, G = 1024, 128, 256, 3
    cfg = _cfg(L, causal, window)
    kv_block, g, q_block, flags, steps = tpu_grid.kv_major_lists(cfg, bq, bk, L // bq, L // bk, G)
    band = tpu_grid.band_work(cfg, bq, bk, L // bq, L // bk)
    valid = (np.asarray(flags) & tpu_grid.VALID) != 0
    got = sorted(zip(np.asarray(kv_block)[valid], np.asarray(g)[valid], np.asarray(q_block)[valid]))
    want = sorted((ki, h, qi) for qi, ki in zip(*np.nonzero(band)) for h in range(G))
    assert got == want
    assert np.all(np.diff(np.asarray(kv_block)) >= 0)  # kv blocks in runs


def test_segment_lists_match_static_lists_without_padding():
    L, b = 1024, 128
    cfg = _cfg(L, causal=True, ids=True)
    ids = jnp.ones((1, L), jnp.int32)
    ranges = tpu_grid.block_ranges(ids, b)
    static = tpu_grid.q_major_lists(cfg, b, b, L // b, L // b)
    dynamic = tpu_grid.q_major_lists(cfg, b, b, L // b, L // b, (ranges, ranges))
    for x, y in zip(static[:3], dynamic[:3]):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
