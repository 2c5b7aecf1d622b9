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
    """The skipped (kv block, q block) pairs hold no kept entry, and clamped index
    maps never point outside the padded arrays (Mosaic would read out of bounds)."""
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
        assert all(0 <= int(tpu._clamp(jnp.int32(ki), lo, hi)) < num_kv for ki in range(num_kv))
    for ki in range(num_kv):
        lo, hi = (int(x) for x in base.q_block_range(cfg, jnp.int32(ki), bq, bk))
        assert all(lo <= qi <= hi for qi in np.flatnonzero(needed[:, ki])), (ki, lo, hi)
        assert all(0 <= int(tpu._clamp(jnp.int32(qi), lo, hi)) < num_q for qi in range(num_q))


def test_tiles_are_clipped_to_the_lengths_and_lengths_padded_to_the_largest_tile():
    options = base.Options(causal=True, scale=1.0, sliding_window=None, logits_soft_cap=None)
    cfg, T_pad, S_pad = base.configure(options, (2, 200, 4, 64), (2, 1000, 2, 64), has_segment_ids=False,
                                       blocks=tpu.BlockSizes.for_platform("tpu"), interpret=False)
    assert (cfg.blocks.block_q, cfg.blocks.block_q_dkv, cfg.blocks.block_kv) == (256, 256, 512)
    assert (T_pad, S_pad) == (256, 1024) and cfg.kv_padded and cfg.groups == 2 and cfg.q_offset == 800
