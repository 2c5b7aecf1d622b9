"""kernels/base.py: the block ranges every kernel skips blocks by, and tile clipping and padding."""

import jax.numpy as jnp
import numpy as np
import pytest

from kernels import base, tpu


@pytest.mark.parametrize("T, S, causal, window", [
    (300, 300, True, None), (300, 300, True, 40), (130, 700, True, 129),
    (700, 130, True, None), (700, 130, True, 3), (520, 520, False, None)])
@pytest.mark.parametrize("bq, bk", [(128, 128), (128, 512), (512, 128)])
def test_block_ranges_cover_the_mask_and_stay_in_bounds(T, S, causal, window, bq, bk):
    """The skipped (kv block, q block) pairs hold no kept entry (the tile lists of
    kernels/tpu_grid.py are built from the same ranges)."""
    options = base.Options(causal=causal, scale=1.0, sliding_window=window, logits_soft_cap=None)
    cfg = base.Config(**vars(options), q_len=T, kv_len=S, groups=1, has_segment_ids=False,
                      kv_padded=True, blocks=tpu.BlockSizes.for_platform("tpu"), interpret=True)
    num_q, num_kv = -(-T // 512) * 512 // bq, -(-S // 512) * 512 // bk  # padded to 512
    mask = np.zeros((num_q * bq, num_kv * bk), bool)
    keep = options.keep_mask(jnp.arange(T)[:, None] + (S - T), jnp.arange(S)[None, :])
    mask[:T, :S] = True if keep is None else np.asarray(keep)
    needed = mask.reshape(num_q, bq, num_kv, bk).any(axis=(1, 3))
    for qi in range(num_q):
        lo, hi = (int(x) for x in base.kv_block_range(cfg, jnp.int32(qi), bq, bk))
        assert all(lo <= ki <= hi for ki in np.flatnonzero(needed[qi])), (qi, lo, hi)
    for ki in range(num_kv):
        lo, hi = (int(x) for x in base.q_block_range(cfg, jnp.int32(ki), bq, bk))
        assert all(lo <= qi <= hi for qi in np.flatnonzero(needed[:, ki])), (ki, lo, hi)


def test_tiles_are_clipped_to_the_lengths_and_lengths_padded_to_the_largest_tile():
    options = base.Options(causal=True, scale=1.0, sliding_window=None, logits_soft_cap=None)
    cfg, T_pad, S_pad = base.configure(options, (2, 200, 4, 64), (2, 1000, 2, 64), has_segment_ids=False,
                                       blocks=tpu.BlockSizes.for_platform("tpu"), interpret=False)
    # The default (unknown generation) row: block_q 512 -> 256, block_kv 1024 stays, compute 512.
    assert (cfg.blocks.block_q, cfg.blocks.block_q_dkv, cfg.blocks.block_kv) == (256, 256, 1024)
    assert cfg.blocks.kv_compute == 512
    assert (T_pad, S_pad) == (256, 1024) and cfg.kv_padded and cfg.groups == 2 and cfg.q_offset == 800
    short, _, _ = base.configure(options, (2, 100, 4, 64), (2, 100, 2, 64), has_segment_ids=False,
                                 blocks=tpu.BlockSizes.for_platform("tpu"), interpret=False)
    assert short.blocks.block_kv == short.blocks.kv_compute == 128  # compute sub-block clipped too


@pytest.mark.parametrize("T, S, causal, window, padded", [
    (512, 512, True, None, False), (512, 512, True, 100, False), (256, 640, True, 129, True),
    (640, 256, True, 3, True), (384, 384, False, None, True), (384, 384, False, 200, False)])
@pytest.mark.parametrize("bq, bk", [(128, 128), (128, 256), (256, 128)])
def test_unmasked_tiles_hold_no_masked_entry(T, S, causal, window, padded, bq, bk):
    """Tiles for which tile_needs_mask is False keep every entry (the unmasked branch is
    exact), and interior tiles of the band are found unmasked."""
    S_pad = -(-S // 256) * 256
    options = base.Options(causal=causal, scale=1.0, sliding_window=window, logits_soft_cap=None)
    cfg = base.Config(**vars(options), q_len=T, kv_len=S - 5 * padded, groups=1, has_segment_ids=False,
                      kv_padded=padded, blocks=tpu.BlockSizes.for_platform("tpu"), interpret=True)
    rows = np.arange(-(-T // 256) * 256)[:, None] + cfg.q_offset
    keep = cfg.keep_mask(rows, np.arange(S_pad)[None, :])
    keep = np.broadcast_to(True if keep is None else np.asarray(keep), (rows.shape[0], S_pad))
    unmasked = 0
    for qi in range(rows.shape[0] // bq):
        for ki in range(S_pad // bk):
            tile = keep[qi * bq:(qi + 1) * bq, ki * bk:(ki + 1) * bk]
            needs = bool(base.tile_needs_mask(cfg, qi * bq, ki * bk, bq, bk))
            assert needs or tile.all(), (qi, ki)
            assert needs == (not tile.all()) or cfg.sliding_window is not None, (qi, ki)  # exact w/o window
            unmasked += not needs
    assert unmasked > 0 or (window or S) < 2 * max(bq, bk)


def test_segment_ranges_decide_the_mask():
    cfg = base.Config(causal=False, scale=1.0, sliding_window=None, logits_soft_cap=None, q_len=256,
                      kv_len=256, groups=1, has_segment_ids=True, kv_padded=False,
                      blocks=tpu.BlockSizes.for_platform("tpu"), interpret=True)
    ids = jnp.asarray(np.repeat([[1, 1, 2, 0]], 64, axis=1).reshape(1, 256))
    q_min, q_max = (np.asarray(x) for x in base.block_id_ranges(ids, 64))
    assert q_min.tolist() == [1, 1, 2, 0] and q_max.tolist() == [1, 1, 2, 0]
    needs = [[bool(base.tile_needs_mask(cfg, 0, 0, 64, 64, (q_min[i], q_max[i], q_min[j], q_max[j])))
              for j in range(4)] for i in range(4)]
    # Only same-segment, non-padding tiles skip the mask.
    assert [[not n for n in row] for row in needs] == [
        [True, True, False, False], [True, True, False, False], [False, False, True, False], [False] * 4]
