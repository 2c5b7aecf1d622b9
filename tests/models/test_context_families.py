"""Context parallelism in every family whose registry record says it supports it: one train step of the
family's tiny preset (float32, packed documents, the reference attention) with the length sharded over
`context=2` equals the 1-device step, metrics and every updated parameter (1e-5). A family that ignored
the zig-zag row order would attend with the natural-order mask to reordered rows and differ."""

from __future__ import annotations

import jax
import pytest
from conftest import tiny_preset

import zoo
from zoo import registry

from step_utils import assert_same_step, packed_batch, single_and_sharded_step

FAMILIES = [name for name, record in registry.FAMILIES.items() if record.context_parallel]
# In CI: the families whose attention differs from Llama's (learned positions; local/global layers with
# soft caps; latent attention). Llama is tests/training/test_context_steps.py; MoE uses Llama's attention.
# All five passed here (6 passed in 316 s, 2026-12-02); `-m slow` runs the other two.
COVERED_ELSEWHERE = ("llama", "moe")


def test_the_decoder_families_support_it():
    assert {"gpt2", "llama", "gemma", "moe", "deepseek"} <= set(FAMILIES)


@pytest.mark.newest_jax_leg  # a 1-device and an 8-device step compile per family: minutes on 2 cores
@pytest.mark.parametrize("family", [pytest.param(f, marks=pytest.mark.slow) if f in COVERED_ELSEWHERE else f
                                    for f in FAMILIES])
def test_one_step_with_context_parallelism_equals_one_device(family):
    if jax.device_count() < 8:
        pytest.skip("needs 8 fake CPU devices (tests/conftest.py)")
    overrides = dict(dtype="float32", param_dtype="float32", attention_impl="xla", context_parallel="allgather")
    if family == "deepseek":
        overrides["num_mtp_layers"] = 0  # MTP shifts ids by array index: refused with context parallelism
    cfg = zoo.config(tiny_preset(family), **overrides)
    objective = registry.FAMILIES[family].objectives[0]
    single, sharded, _ = single_and_sharded_step(cfg, packed_batch(cfg.vocab_size), "context=2,fsdp=4",
                                                 objective=objective)
    assert_same_step(single, sharded, keys=tuple(sorted(single[1])))
