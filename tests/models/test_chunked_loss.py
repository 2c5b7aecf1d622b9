"""The cross-entropy over vocabulary blocks (zoo/nn/chunked_ce.py) equals the cross-entropy of
the whole float32 logits, values and gradients, for every head variant and every family, on one
device and with the vocabulary split over a mesh axis, and never builds [B, T, V] logits."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_preset
from flax import linen as nn

import zoo
from zoo import objectives, registry
from zoo.configs import parse_overrides, with_overrides
from zoo.nn.chunked_ce import vocab_stats
from zoo.nn.losses import cross_entropy_sums, vocab_cross_entropy_sums
from zoo.nn.vocab_head import VocabHead
from zoo.sharding import logical_size, make_mesh
from zoo.training.step import mesh_context

from step_utils import packed_batch

B, T, D, V = 2, 7, 16, 50


def _params(model, b, t):
    return nn.unbox(model.init(jax.random.key(0), jnp.ones((b, t), jnp.int32))["params"])


def _inputs(seed=0, dtype=jnp.float32):
    k = jax.random.split(jax.random.key(seed), 3)
    h = jax.random.normal(k[0], (B, T, D), dtype)
    targets = jax.random.randint(k[1], (B, T), 0, V)
    valid = jax.random.uniform(k[2], (B, T)) < 0.7
    return h, targets, valid


def _head(layout, bias, softcap, dtype=jnp.float32, seed=1):
    k = jax.random.split(jax.random.key(seed), 2)
    w = jax.random.normal(k[0], (V, D) if layout == "VD" else (D, V), dtype) * 0.3
    b = jax.random.normal(k[1], (V,), dtype) if bias else None
    return VocabHead(w, b, layout, softcap, jnp.dtype(dtype))


def _both(h, head, targets, valid, z_loss, block):
    """(total, sums) and d total / d (h, head), chunked and on the whole logits."""
    def chunked(h, head):
        return vocab_cross_entropy_sums(h, head, targets, valid, z_loss, vocab_block=block)

    def whole(h, head):
        return cross_entropy_sums(head.logits(h), targets, valid, z_loss)

    return [jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(h, head) for f in (chunked, whole)]


def _assert_grads_close(ga, gb, tol, atol=1e-9):
    """Per leaf: max |a - b| <= tol * max |b| + atol (a relative bound that near-zero entries cannot
    break; atol for leaves whose exact gradient is 0, as a key bias's, that hold only rounding noise)."""
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ga), jax.tree.leaves(gb)):
        scale = float(jnp.max(jnp.abs(b)))
        assert float(jnp.max(jnp.abs(a - b))) <= tol * scale + atol, (jax.tree_util.keystr(path), scale)


# Every value of every axis at least once: ragged (7, 16), one block (50), a block wider than V (64).
CASES = [("VD", False, None, 7, 0.0), ("DV", False, None, 16, 1e-4), ("VD", True, None, 50, 0.1),
         ("DV", True, 5.0, 7, 0.1), ("VD", False, 5.0, 64, 1e-4), ("DV", True, None, 64, 0.0),
         ("VD", True, 5.0, 16, 0.0)]


@pytest.mark.parametrize("layout, bias, softcap, block, z_loss", CASES)
def test_blockwise_loss_and_gradients_equal_the_whole_logits(layout, bias, softcap, block, z_loss):
    h, targets, valid = _inputs()
    ((total, sums), grads), ((ref_total, ref_sums), ref_grads) = _both(
        h, _head(layout, bias, softcap), targets, valid, z_loss, block)
    np.testing.assert_allclose(total, ref_total, rtol=1e-6)
    for key in ("nll", "z_loss"):
        np.testing.assert_allclose(sums[key], ref_sums[key], rtol=1e-6, err_msg=key)
    assert sums["weight"] == ref_sums["weight"] and sums["accuracy"] == ref_sums["accuracy"]
    _assert_grads_close(grads, ref_grads, 1e-6)
    assert grads[1].bias is None if not bias else float(jnp.max(jnp.abs(grads[1].bias))) > 0


@pytest.mark.parametrize("layout, bias, softcap, block, z_loss", CASES[:4])
def test_blockwise_loss_is_the_same_algebra_in_float64(layout, bias, softcap, block, z_loss):
    with jax.enable_x64(True):
        h, targets, valid = _inputs(dtype=jnp.float64)
        ((total, _), grads), ((ref_total, _), ref_grads) = _both(
            h, _head(layout, bias, softcap, jnp.float64), targets, valid, z_loss, block)
        assert total.dtype == jnp.float64
        np.testing.assert_allclose(total, ref_total, rtol=1e-13)
        _assert_grads_close(grads, ref_grads, 1e-12, atol=0)


def test_argmax_ties_go_to_the_first_index_as_jnp_argmax():
    h, targets, _ = _inputs()
    w = _head("VD", False, None).weight
    w = w.at[30].set(w[3]).at[45].set(w[44]).at[49].set(w[43])  # duplicates across blocks, and in the overlap
    head = VocabHead(w)
    h = h.at[0, 0].set(w[3] * 10).at[0, 1].set(w[44] * 10).at[0, 2].set(w[43] * 10)  # rows whose max ties
    want = jnp.argmax(head.logits(h), axis=-1)
    assert {int(want[0, 0]), int(want[0, 1]), int(want[0, 2])} == {3, 44, 43}
    for block in (7, 16, 50):
        np.testing.assert_array_equal(vocab_stats(h, head, targets, vocab_block=block).argmax, want)


def test_masked_tokens_get_no_gradient():
    h, targets, valid = _inputs()
    ((_, _), (dh, _)), _ = _both(h, _head("DV", True, 5.0), targets, valid, 0.1, 16)
    assert float(jnp.max(jnp.abs(jnp.where(valid[..., None], 0.0, dh)))) == 0.0
    assert float(jnp.min(jnp.max(jnp.abs(jnp.where(valid[..., None], dh, 1.0)), axis=-1))) > 0


@pytest.mark.parametrize("block", [512, 0])
def test_the_blockwise_loss_never_builds_vocab_sized_logits(block):
    cfg = zoo.config("tiny-llama", vocab_size=4096, dtype="float32", loss_vocab_block=block)
    model = zoo.build(cfg)
    batch = packed_batch(cfg.vocab_size, b=2, t=64)
    params = jax.eval_shape(lambda: _params(model, 2, 64))
    loss = objectives.get("clm").loss_fn

    def total(p):
        return loss(model, p, batch, None)[0]

    text = jax.jit(jax.grad(total)).lower(params).as_text()
    # whole logits [2, 64, 4096], or one block spanning the vocabulary [2, 64, 1, 4096]
    assert bool(re.search(r"tensor<2x64x(1x)?4096x", text)) == (block == 0)


def test_vocab_split_over_the_mesh_equals_one_device():
    if jax.device_count() < 8:
        pytest.skip("needs 8 fake CPU devices (tests/conftest.py)")
    cfg = zoo.config("tiny-llama", dtype="float32", loss_vocab_block=96)  # 2 shards x 3 blocks, ragged
    model = zoo.build(cfg)
    batch = packed_batch(cfg.vocab_size)
    params = _params(model, 8, 32)
    loss = objectives.get("clm").loss_fn
    step = jax.jit(jax.value_and_grad(lambda p, b: loss(model, p, b, None, z_loss=1e-3), has_aux=True))
    (one, _), g_one = step(params, batch)
    whole = zoo.build(cfg.replace(loss_vocab_block=0))
    (ref, _), g_ref = jax.jit(jax.value_and_grad(lambda p, b: loss(whole, p, b, None, z_loss=1e-3),
                                                 has_aux=True))(params, batch)
    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    with mesh_context(mesh):
        assert logical_size("vocab") == 2  # the head is really split: 2 shards x 3 blocks of 96 of 256 rows
        (split, _), g_split = step(params, batch)
    for value in (one, split):
        np.testing.assert_allclose(value, ref, rtol=1e-6)
    _assert_grads_close(g_split, g_ref, 1e-6)
    _assert_grads_close(g_one, g_ref, 1e-6)


FAMILY_OVERRIDES = {"deepseek": {"num_mtp_layers": 1, "mtp_loss_weight": 0.3}}  # the MTP loss is chunked too


@pytest.mark.newest_jax_leg  # 8 families x 2 compiles (~3.5 min): CI runs it on the newest-JAX leg only
@pytest.mark.parametrize("family", list(registry.FAMILIES))
def test_every_family_trains_on_the_blockwise_loss_exactly(family):
    """The family's pretraining objective: loss, every sum (aux losses and router loads included)
    and every parameter's gradient, chunked in 3 ragged blocks vs the whole logits."""
    cfg = zoo.config(tiny_preset(family), dtype="float32", param_dtype="float32", **FAMILY_OVERRIDES.get(family, {}))
    objective = objectives.get(registry.FAMILIES[family].objectives[0])
    batch = packed_batch(cfg.vocab_size, b=4, t=32)
    params = _params(zoo.build(cfg), 4, 32)
    out = []
    for block in (cfg.vocab_size // 3 + 1, 0):
        model = zoo.build(cfg.replace(loss_vocab_block=block))
        fn = jax.jit(jax.value_and_grad(lambda p: objective.loss_fn(model, p, batch, jax.random.key(1), z_loss=1e-3),
                                        has_aux=True))
        out.append(fn(params))
    ((total, sums), grads), ((ref_total, ref_sums), ref_grads) = out
    np.testing.assert_allclose(total, ref_total, rtol=1e-6)
    assert sorted(sums) == sorted(ref_sums)
    for key in sums:
        np.testing.assert_allclose(sums[key], ref_sums[key], rtol=1e-6, err_msg=key)
    if family in FAMILY_OVERRIDES:
        assert "mtp_loss" in sums
    _assert_grads_close(grads, ref_grads, 1e-6, atol=1e-8)


def test_a_negative_block_is_refused():
    with pytest.raises(ValueError, match="loss_vocab_block"):
        zoo.config("tiny-llama", loss_vocab_block=-1)
    cfg = with_overrides(zoo.config("tiny-llama"), parse_overrides(["loss_vocab_block=0"]))
    assert cfg.loss_vocab_block == 0 and zoo.config("tiny-llama").loss_vocab_block == 4096
