"""The TPU kernel (kernels/tpu.py) beyond the conformance suite: tile configurations
the default dispatch does not use, and block-size validation."""

import dataclasses

import jax.numpy as jnp
import pytest

from kernels import reference_attention, tpu

from kernel_utils import check_close, compiled, direct, inputs, segments, value_and_grads


def test_block_sizes_spanning_several_kv_blocks_per_q_block():
    # Unequal q/kv tiles (and different ones per kernel) exercise the block-range
    # arithmetic and the index-map clamping of skipped blocks.
    (q, k, v, do) = inputs((2, 140, 4, 64), (2, 333, 2, 64), jnp.float32)
    kv_ids = segments([(100, 233), (333,)], 333)
    options = dict(causal=True, sliding_window=129, segment_ids=(kv_ids[:, -140:], kv_ids))
    blocks = tpu.BlockSizes(block_q=256, block_kv=128, block_q_dq=128, block_kv_dq=256,
                            block_q_dkv=128, block_kv_dkv=256)
    flash = direct(tpu.flash_attention, block_sizes=blocks, interpret=True)
    got = compiled(lambda *a: value_and_grads(lambda q, k, v: flash(q, k, v, **options), *a), q, k, v, do)
    want = value_and_grads(lambda q, k, v: reference_attention(q, k, v, **options), q, k, v, do)
    for what, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        check_close(g, w, 1e-5 if what == "out" else 1e-4, what)


def test_block_sizes_are_validated():
    with pytest.raises(ValueError, match="128"):
        dataclasses.replace(tpu.BlockSizes.for_platform("tpu"), block_q=192)
