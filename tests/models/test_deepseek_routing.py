"""DeepSeekMoE routing (zoo/models/deepseek/routing.py) against a float64 numpy implementation
of transformers' three methods, on hand-built score matrices and random rows; the
auxiliary-loss-free bias update moves a skewed load toward balance."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from zoo.models.deepseek.routing import bias_update, route_grouped

from deepseek_reference import np_route


def _logit(p):
    p = np.asarray(p, np.float64)
    return np.log(p / (1 - p))


def test_group_limited_choice_on_hand_built_scores():
    """E=8 in 4 groups, 2 groups kept, top-2, weights renormalised and scaled by 2.5.
    Row A: the best single expert (0, score 0.95) sits in a weak group (0.95 + 0.01) and loses
    to groups B (0.62 + 0.60) and C (0.50 + 0.58). Row B: a bias of 0.1 on expert 5 changes the
    choice (5 beats 3) but not the weights, which come from the unbiased scores."""
    s = [0.95, 0.01, 0.62, 0.60, 0.50, 0.58, 0.10, 0.20]
    logits = jnp.asarray(_logit([s, s]), jnp.float32)
    kw = dict(k=2, method="noaux_tc", n_group=4, topk_group=2, normalize=True, scale=2.5)
    w, idx, _ = route_grouped(logits, None, **kw)
    assert sorted(np.asarray(idx[0]).tolist()) == [2, 3]
    np.testing.assert_allclose(np.sort(np.asarray(w[0])), np.sort(2.5 * np.array([0.62, 0.60]) / 1.22), rtol=1e-5)
    bias = jnp.zeros(8).at[5].set(0.10)
    w, idx, _ = route_grouped(logits, bias, **kw)
    assert np.asarray(idx[0]).tolist() == [5, 2]
    np.testing.assert_allclose(np.asarray(w[0]), 2.5 * np.array([0.58, 0.62]) / 1.20, rtol=1e-5)


@pytest.mark.parametrize("method, normalize, scale", [("noaux_tc", True, 2.5), ("group_limited_greedy", False, 16.0),
                                                      ("greedy", False, 1.0)])
def test_random_rows_match_float64_reference(method, normalize, scale):
    rng = np.random.default_rng(0)
    n, e, groups, topk_group, k = 64, 16, 4, 2, 3
    logits = rng.normal(size=(n, e)) * 2.0
    bias = rng.normal(size=e) * 0.1 if method == "noaux_tc" else np.zeros(e)
    w, idx, probs = route_grouped(jnp.asarray(logits, jnp.float32), jnp.asarray(bias, jnp.float32), k=k,
                                  method=method, n_group=groups, topk_group=topk_group, normalize=normalize,
                                  scale=scale)
    ref_idx, ref_w = np_route(logits, bias, k, method, groups, topk_group, normalize, scale)
    idx, w = np.asarray(idx), np.asarray(w)
    for r in range(n):
        assert sorted(idx[r].tolist()) == sorted(ref_idx[r].tolist()), r
        by_expert = dict(zip(ref_idx[r].tolist(), ref_w[r].tolist()))
        np.testing.assert_allclose(w[r], [by_expert[i] for i in idx[r].tolist()], rtol=1e-5, atol=1e-6)
    if method != "greedy":  # every chosen expert sits in one of the topk_group kept groups
        assert all(len(set((idx[r] // (e // groups)).tolist())) <= topk_group for r in range(n))
    np.testing.assert_allclose(np.asarray(probs).sum(-1), 1.0, rtol=1e-5)


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="topk_method"):
        route_grouped(jnp.zeros((2, 4)), k=1, method="aux_loss", normalize=True)


def test_bias_update_moves_a_skewed_load_toward_balance():
    """Tokens whose router strongly prefers experts 0-1: repeated sign updates of the correction
    bias spread the assignments (the choice only: the weights stay the unbiased scores)."""
    rng = np.random.default_rng(1)
    n, e, k = 512, 8, 2
    logits = rng.normal(size=(n, e)) * 0.5
    logits[:, :2] += 2.0  # skewed: experts 0 and 1 win almost every token
    logits = jnp.asarray(logits, jnp.float32)
    kw = dict(k=k, method="noaux_tc", n_group=1, topk_group=1, normalize=True)

    def load(bias):
        _, idx, _ = route_grouped(logits, bias, **kw)
        return np.bincount(np.asarray(idx).reshape(-1), minlength=e).astype(np.float32)

    bias = jnp.zeros((1, e), jnp.float32)
    first = load(bias[0])
    assert first.max() / first.mean() > 3.0
    for _ in range(200):
        bias = bias_update(bias, jnp.asarray(load(bias[0]))[None], rate=0.01)
    last = load(bias[0])
    assert last.max() / last.mean() < 1.5, (first, last)
    assert float(bias[0, :2].max()) < 0 < float(bias[0, 2:].min())  # the favourites were pushed down
    np.testing.assert_array_equal(np.asarray(bias_update(bias, jnp.full((1, e), 7.0), 0.01)), np.asarray(bias))
