"""The TPU kernel (kernels/tpu.py) beyond the conformance suite: tile configurations
the default dispatch does not use, block-size validation, the per-generation block
table and VMEM limits (kernels/tpu_tuning.py) and the kernels' cost estimates."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from kernels import base, reference_attention, tpu, tpu_grid, tpu_tuning

from kernel_utils import check_close, compiled, direct, inputs, segments, value_and_grads


@pytest.mark.parametrize("blocks", [
    tpu.BlockSizes(block_q=256, block_kv=128, block_q_dq=128, block_kv_dq=256, block_q_dkv=128,
                   block_kv_dkv=256),
    # kv tiles of 256 keys computed in sub-blocks of 128, some of them outside the band.
    tpu.BlockSizes(block_q=128, block_kv=256, block_kv_compute=128, block_q_dq=128, block_kv_dq=128,
                   block_q_dkv=128, block_kv_dkv=128),
], ids=["unequal_tiles", "kv_compute_sub_blocks"])
def test_block_sizes_spanning_several_kv_blocks_per_q_block(blocks):
    # Unequal q/kv tiles (and different ones per kernel) exercise the block-range
    # arithmetic and the index-map clamping of skipped blocks.
    (q, k, v, do) = inputs((2, 140, 4, 64), (2, 333, 2, 64), jnp.float32)
    kv_ids = segments([(100, 233), (333,)], 333)
    options = dict(causal=True, sliding_window=129, segment_ids=(kv_ids[:, -140:], kv_ids))
    flash = direct(tpu.flash_attention, block_sizes=blocks, interpret=True)
    got = compiled(lambda *a: value_and_grads(lambda q, k, v: flash(q, k, v, **options), *a), q, k, v, do)
    want = value_and_grads(lambda q, k, v: reference_attention(q, k, v, **options), q, k, v, do)
    for what, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        check_close(g, w, 1e-5 if what == "out" else 1e-4, what)


def test_block_sizes_are_validated():
    with pytest.raises(ValueError, match="128"):
        dataclasses.replace(tpu.BlockSizes.for_platform("tpu"), block_q=192)

    with pytest.raises(ValueError, match="block_kv_compute"):
        tpu.BlockSizes(*(256,) * 6, block_kv_compute=512)


@pytest.mark.parametrize("generation", sorted(tpu_tuning.TABLE))
@pytest.mark.parametrize("head_dim", [64, 128, 192, 256])
def test_table_rows_fit_the_generations_vmem(generation, head_dim):
    for dtype in ("bfloat16", "float32"):
        blocks = tpu.BlockSizes.for_platform("tpu", generation, head_dim, dtype)
        capacity = tpu_tuning.VMEM_BYTES[generation]
        assert blocks.block_kv % blocks.kv_compute == 0
        assert blocks.kv_compute % tpu_tuning.MXU[generation] == 0
        assert blocks.vmem_limit_bytes <= capacity * 3 // 4
        assert max(tpu_tuning.vmem_bytes(blocks, head_dim, dtype)) <= blocks.vmem_limit_bytes
    # An unknown generation: the smallest row and Mosaic's default limit.
    default = tpu.BlockSizes.for_platform("tpu", None, head_dim)
    assert default.vmem_limit_bytes is None
    assert max(tpu_tuning.vmem_bytes(default, head_dim, "float32")) <= 16 * tpu_tuning.MIB * 3 // 4


def test_device_kinds_map_to_generations():
    assert [tpu_tuning.generation_of(kind) for kind in
            ("TPU v4", "TPU v5 lite", "TPU v5", "TPU v6 lite", "cpu", None)] == [
                "v4", "v5e", "v5p", "v6e", None, None]


def _config(T, S, causal=False, window=None, groups=1, blocks=None):
    options = base.Options(causal=causal, scale=1.0, sliding_window=window, logits_soft_cap=None)
    blocks = blocks or tpu.BlockSizes(block_q=128, block_kv=256, block_kv_compute=128, block_q_dq=128,
                                      block_kv_dq=128, block_q_dkv=128, block_kv_dkv=256)
    return base.configure(options, (1, T, groups, 64), (1, S, 1, 64), has_segment_ids=False, blocks=blocks,
                          interpret=True)


@pytest.mark.parametrize("T, S, causal, window", [
    (1024, 1024, True, None), (1024, 1024, True, 200), (300, 700, True, 129), (700, 300, False, 3),
    (512, 512, False, None)])
def test_numpy_block_ranges_match_the_kernels(T, S, causal, window):
    cfg, T_pad, _ = _config(T, S, causal, window)
    for bq, bk in ((128, 128), (128, 256), (256, 128)):
        qi = np.arange(T_pad // bq)
        lo, hi = tpu_tuning.kv_block_range(cfg, qi, bq, bk)
        want = base.kv_block_range(cfg, jnp.asarray(qi, jnp.int32), bq, bk)
        np.testing.assert_array_equal(lo, want[0])
        np.testing.assert_array_equal(hi, want[1])


def test_cost_estimates_count_the_visited_tiles():
    B, N, H, L = 2, 4, 64, 1024
    full, T_pad, S_pad = _config(L, L, groups=2)
    causal, _, _ = _config(L, L, causal=True, groups=2)
    fwd, dq, dkv = tpu_tuning.cost_estimates(full, B, N, T_pad, S_pad, H, 2)
    assert fwd.flops == 4 * B * N * L * L * H  # the forward's two matmuls, every tile
    assert dq.flops + dkv.flops == 10 * B * N * L * L * H  # 2.5x the forward
    assert fwd.transcendentals >= B * N * L * L and dq.transcendentals == dkv.transcendentals == B * N * L * L
    assert fwd.bytes_accessed >= 2 * B * N * L * H * 2  # q read and o written at least once
    c_fwd, c_dq, c_dkv = tpu_tuning.cost_estimates(causal, B, N, T_pad, S_pad, H, 2)
    blocks_per_side = L // 128
    half = blocks_per_side * (blocks_per_side + 1) / 2 / blocks_per_side ** 2  # lower triangle + diagonal
    assert c_fwd.flops == pytest.approx(fwd.flops * half)
    assert c_dq.flops == pytest.approx(dq.flops * half)
    assert c_dkv.flops <= dkv.flops * 0.625 and c_fwd.bytes_accessed < fwd.bytes_accessed


@pytest.mark.parametrize("causal, window", [(True, None), (False, None), (True, 24)])
def test_compacted_grid_on_a_packed_batch_of_64_documents(causal, window):
    # 2 rows x 32 documents of random lengths (then padding): the tile lists skip every tile
    # between documents; tiles inside one document run unmasked.
    rng = np.random.default_rng(1)
    L = 768
    ids = segments([tuple(int(n) for n in rng.integers(4, 40, size=32)) for _ in range(2)], L)
    (q, k, v, do) = inputs((2, L, 4, 64), (2, L, 2, 64), jnp.float32, seed=3)
    options = dict(causal=causal, sliding_window=window, segment_ids=ids)
    flash = direct(tpu.flash_attention, block_sizes=tpu.BlockSizes(*(128,) * 6), interpret=True)
    got = compiled(lambda *a: value_and_grads(lambda q, k, v: flash(q, k, v, **options), *a), q, k, v, do)
    want = value_and_grads(lambda q, k, v: reference_attention(q, k, v, **options), q, k, v, do)
    for what, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        check_close(g, w, 1e-5 if what == "out" else 1e-4, what)
    padding = np.asarray(ids) == 0
    assert padding.any() and np.all(np.asarray(got[0])[padding] == 0) and np.all(np.asarray(got[2])[padding] == 0)


@pytest.mark.parametrize("generation", ["v5e", "v5p", "v6e"])
@pytest.mark.parametrize("head_dim", [128, 256])
def test_table_stacks_gqa_heads_where_they_fit(generation, head_dim):
    # Stacked only where it fits VMEM and G * block_q still exceeds the unstacked block_q
    # (fewer K/V fetches); no stacking without GQA or without a known generation.
    plain = tpu.BlockSizes.for_platform("tpu", generation, head_dim, "bfloat16")
    assert plain.stack_gqa is False
    assert tpu.BlockSizes.for_platform("tpu", None, head_dim, "bfloat16", 4).stack_gqa is False
    for groups in (2, 4, 8):
        for dtype in ("bfloat16", "float32"):
            blocks = tpu.BlockSizes.for_platform("tpu", generation, head_dim, dtype, groups)
            assert blocks.stack_gqa and groups * blocks.block_q > plain.block_q
            assert max(tpu_tuning.vmem_bytes(blocks, head_dim, dtype, groups=groups)) <= blocks.vmem_limit_bytes
            assert blocks.vmem_limit_bytes <= tpu_tuning.VMEM_BYTES[generation] * 3 // 4
    assert tpu.BlockSizes.for_platform("cpu", groups=2).stack_gqa
    assert not tpu.BlockSizes.for_platform("cpu", groups=1).stack_gqa
    # Sizes given per call: stacked unless the stacked tiles overflow their VMEM limit.
    given = tpu.BlockSizes(*(1024,) * 6)
    assert given.resolved(8, head_dim, "float32", interpret=True).stack_gqa
    assert not given.resolved(8, head_dim, "float32", interpret=False).stack_gqa  # 16 MiB default
    assert not given.resolved(1, head_dim, "float32", interpret=True).stack_gqa


def _kv_fetches(cfg, B, N, L, bq, bk, heads):
    """K/V block fetches of a forward grid (B, N // heads, list steps) walked in order: the
    pipeline fetches a block when its index (batch, kv head, kv block) differs from the
    previous step's, as Pallas's TPU pipeline does."""
    q_block, kv_block, flags, steps = tpu_grid.q_major_lists(cfg, bq, bk, L // bq, L // bk)
    kv_block = np.asarray(kv_block)
    fetches, last = 0, None
    for b in range(B):
        for n in range(N // heads):
            for s in range(steps):
                index = (b, n // (cfg.groups // heads), kv_block[s])
                fetches += index != last
                last = index
    return fetches


@pytest.mark.parametrize("groups", [2, 4, 8])
def test_stacked_gqa_fetches_kv_once_per_group(groups):
    B, N, H, L = 2, 8, 128, 2048
    stats = {}
    for stack in (False, True):
        blocks = tpu.BlockSizes(block_q=256, block_kv=512, block_kv_compute=256, block_q_dq=256,
                                block_kv_dq=256, block_q_dkv=256, block_kv_dkv=256, stack_gqa=stack)
        cfg, T_pad, S_pad = _config(L, L, causal=True, groups=groups, blocks=blocks)
        fwd, dq, dkv = tpu_tuning.cost_estimates(cfg, B, N, T_pad, S_pad, H, 2)
        q_side = B * N * (2 * T_pad * H * 2 + T_pad * 8 * 4)  # q read, o and lse written
        dq_side = B * N * (3 * T_pad * H * 2 + 2 * T_pad * 8 * 4)  # q, do read, dq written; lse, delta
        stats[stack] = dict(fwd_kv=fwd.bytes_accessed - q_side, dq_kv=dq.bytes_accessed - dq_side,
                            flops=(fwd.flops, dq.flops, dkv.flops), dkv_bytes=dkv.bytes_accessed,
                            fetches=_kv_fetches(cfg, B, N, L, 256, 512, groups if stack else 1))
    unstacked, stacked = stats[False], stats[True]
    assert stacked["flops"] == unstacked["flops"] and stacked["dkv_bytes"] == unstacked["dkv_bytes"]
    assert stacked["fwd_kv"] > 0 and unstacked["fwd_kv"] == groups * stacked["fwd_kv"]
    assert stacked["dq_kv"] > 0 and unstacked["dq_kv"] == groups * stacked["dq_kv"]
    assert unstacked["fetches"] == groups * stacked["fetches"]
    # The estimate books one [block_kv, H] K and V tile per visited tile: the fetches, plus the
    # few that the pipeline saves where consecutive q blocks start and end on one kv block.
    booked = stacked["fwd_kv"] // (2 * 512 * H * 2)
    assert stacked["fetches"] <= booked <= 1.15 * stacked["fetches"]
    print(f"G={groups}: fwd K/V bytes {unstacked['fwd_kv']} -> {stacked['fwd_kv']}, "
          f"dq K/V bytes {unstacked['dq_kv']} -> {stacked['dq_kv']}, "
          f"K/V fetches {unstacked['fetches']} -> {stacked['fetches']}")  # shown with -s
