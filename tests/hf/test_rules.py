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
