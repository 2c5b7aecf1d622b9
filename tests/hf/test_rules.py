"""zoo.hf.rules: every layout is an exact inverse pair, stacked placeholders expand in order,
and each family's record lists exactly the HF classes its table converts."""

from __future__ import annotations

import numpy as np
import pytest

from zoo import registry
from zoo.hf.rules import ArchSpec, Rule, token_ids_from_hf, token_ids_to_hf


@pytest.mark.parametrize("rule, zoo_shapes", [
    (Rule("w", ("a",), "copy", (4, 6)), [(2, 2, 6)]),
    (Rule("w", ("a",), "linear", (6, 4)), [(4, 3, 2)]),
    (Rule("w", ("q", "k", "v"), "fused", (4, 9)), [(4, 3)] * 3),
    (Rule("w", ("q", "k", "v"), "fused_linear", (12, 4)), [(4, 4, 2), (4, 1, 2), (4, 1, 2)]),
    (Rule("w", ("q",), "linear_rope_pairs", (3 * 8, 5)), [(5, 3, 8)]),
    (Rule("w", ("nope", "rope"), "linear_split_rope_pairs", (3 * (6 + 4), 5)), [(5, 3, 6), (5, 3, 4)]),
    (Rule("w", ("latent", "rope"), "linear_split_rope_pairs", (7 + 4, 5)), [(5, 7), (5, 4)]),
    (Rule("w", ("k", "v"), "linear_split", (2 * (3 + 5), 4)), [(4, 2, 3), (4, 2, 5)]),
])
def test_layouts_round_trip_bit_exactly(rule, zoo_shapes):
    x = np.random.default_rng(0).standard_normal(rule.hf_shape).astype(np.float32)
    pieces = rule.to_zoo(x, zoo_shapes)
    assert [p.shape for p in pieces] == zoo_shapes
    np.testing.assert_array_equal(rule.to_hf(pieces), x)


def test_linear_layout_transposes_torch_weights():
    w = np.arange(6, dtype=np.float32).reshape(3, 2)  # torch nn.Linear [out, in]
    (kernel,) = Rule("w", ("a",), "linear", (3, 2)).to_zoo(w, [(2, 3)])
    np.testing.assert_array_equal(kernel, w.T)


def test_fused_linear_layout_splits_torch_output_rows_by_size():
    w = np.arange(24, dtype=np.float32).reshape(6, 4)  # [q rows 0-3 | k rows 4-5], in = 4
    q, k = Rule("w", ("q", "k"), "fused_linear", (6, 4)).to_zoo(w, [(4, 2, 2), (4, 2)])
    np.testing.assert_array_equal(q.reshape(4, 4), w[:4].T)
    np.testing.assert_array_equal(k, w[4:].T)


def test_linear_split_takes_each_heads_rows_in_order():
    """kv_b_proj-like [N * (Dn + Dv), R]: head n's rows are n*(Dn+Dv) + [0, Dn) for k, then Dv for v;
    with _rope_pairs the last part's rows come even-then-odd."""
    n, dn, dv, r = 2, 3, 4, 5
    w = np.arange(n * (dn + dv) * r, dtype=np.float32).reshape(n * (dn + dv), r)
    k, v = Rule("w", ("k", "v"), "linear_split", w.shape).to_zoo(w, [(r, n, dn), (r, n, dv)])
    for h in range(n):
        np.testing.assert_array_equal(k[:, h, :], w[h * (dn + dv):h * (dn + dv) + dn].T)
        np.testing.assert_array_equal(v[:, h, :], w[h * (dn + dv) + dn:(h + 1) * (dn + dv)].T)
    _, rope = Rule("w", ("k", "v"), "linear_split_rope_pairs", w.shape).to_zoo(w, [(r, n, dn), (r, n, dv)])
    np.testing.assert_array_equal(rope[:, 1, :], w[(dn + dv) + dn + np.array([0, 2, 1, 3])].T)


def test_stack_entries_take_start_and_stride():
    rule = Rule("l.{i}.e.{e}", ("a",), "copy", (2,), (("i", 3, 1, 2), ("e", 2)))
    assert [key for key, _ in rule.expand()] == [f"l.{i}.e.{e}" for i in (1, 3, 5) for e in (0, 1)]
    assert [idx for _, idx in rule.expand()][-1] == (2, 1)


def _hf_interleaved_rope(x, pos, inv_freq):
    """Llama 4's RoPE (transformers' apply_rotary_emb): pairs (x[2i], x[2i+1]) as complex numbers."""
    z = (x[..., 0::2] + 1j * x[..., 1::2]) * np.exp(1j * pos[:, None, None] * inv_freq)
    return np.stack([z.real, z.imag], axis=-1).reshape(x.shape)


def _zoo_half_split_rope(x, pos, inv_freq):
    """zoo.nn.rope's rotation: (x[i], x[i + H/2]) rotated by the same angle."""
    half = x.shape[-1] // 2
    cos, sin = np.cos(pos[:, None, None] * inv_freq), np.sin(pos[:, None, None] * inv_freq)
    a, b = x[..., :half], x[..., half:]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


def test_rope_pair_rows_give_the_same_logits_under_half_split_rope():
    """q_proj/k_proj in the "linear_rope_pairs" layout: the zoo's half-split RoPE on the permuted
    projections, then the parameter-free RMS norm and q.k, equal Llama 4's interleaved computation."""
    rng = np.random.default_rng(0)
    d, heads, h, t = 12, 2, 8, 7
    w_q, w_k = rng.standard_normal((heads * h, d)), rng.standard_normal((heads * h, d))  # torch [out, in]
    x, pos = rng.standard_normal((t, d)), np.arange(t, dtype=np.float64) * 3.0
    inv_freq = 1.0 / 500000.0 ** (np.arange(0, h, 2) / h)
    rule = lambda w: Rule("w", ("a",), "linear_rope_pairs", w.shape)
    norm = lambda y: y / np.sqrt(np.mean(y * y, -1, keepdims=True) + 1e-5)

    def logits(q, k, rope):
        q, k = (norm(rope(y, pos, inv_freq)) for y in (q, k))
        return np.einsum("tnh,snh->nts", q, k)

    hf = logits((x @ w_q.T).reshape(t, heads, h), (x @ w_k.T).reshape(t, heads, h), _hf_interleaved_rope)
    (kq,), (kk,) = rule(w_q).to_zoo(w_q, [(d, heads, h)]), rule(w_k).to_zoo(w_k, [(d, heads, h)])
    ours = logits(np.einsum("td,dnh->tnh", x, kq), np.einsum("td,dnh->tnh", x, kk), _zoo_half_split_rope)
    np.testing.assert_allclose(ours, hf, rtol=1e-12, atol=1e-12)
    plain = Rule("w", ("a",), "linear", w_q.shape).to_zoo(w_q, [(d, heads, h)])[0]  # without the row order
    wrong = logits(np.einsum("td,dnh->tnh", x, plain), np.einsum("td,dnh->tnh", x, kk), _zoo_half_split_rope)
    assert np.abs(wrong - hf).max() > 0.1


def test_unknown_layout_is_refused():
    with pytest.raises(ValueError, match="unknown layout"):
        Rule("w", ("a",), "transpose", (2, 2))


def test_stacked_placeholders_expand_in_zoo_axis_order():
    rule = Rule("l.{i}.e.{e}.w", ("a",), "copy", (2,), (("i", 2), ("e", 3)))
    keys = list(rule.expand())
    assert keys[0] == ("l.0.e.0.w", (0, 0)) and keys[-1] == ("l.1.e.2.w", (1, 2)) and len(keys) == 6


def test_token_ids_fill_class_defaults_and_round_trip_lists():
    ids = token_ids_from_hf({"eos_token_id": [1, 2]}, (7, 8, None))
    assert ids == {"bos_token_id": 7, "eos_token_id": (1, 2), "pad_token_id": None}

    class Cfg:
        bos_token_id, eos_token_id, pad_token_id = 7, (1, 2), None

    assert token_ids_to_hf(Cfg) == {"bos_token_id": 7, "eos_token_id": [1, 2], "pad_token_id": None}


@pytest.mark.parametrize("name", sorted(registry.FAMILIES))
def test_each_family_record_points_at_its_tables(name):
    family = registry.FAMILIES[name]
    assert family.hf_architectures and all(isinstance(s, ArchSpec) for s in family.hf_specs.values())
    for arch in family.hf_architectures:
        assert registry.by_architecture(arch) is family
