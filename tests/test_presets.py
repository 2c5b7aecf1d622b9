"""Full-size presets: each builds abstractly (jax.eval_shape, no memory) and has the
published parameter count; for the HF decoder families, transformers builds the same
number of parameters (on torch's meta device) from the config that `config_to_hf` writes.
"""

from __future__ import annotations

import pytest

import zoo

# Published parameter counts (HF model cards / `num_parameters()` of the released checkpoints).
PUBLISHED = {
    "gpt2-124m": 124.44e6,
    "gpt2-350m": 354.82e6,
    "gpt2-774m": 774.03e6,
    "gpt2-1.5b": 1557.6e6,
    "llama3.2-1b": 1.2358e9,
    "llama3.2-3b": 3.2127e9,
    "llama3.1-8b": 8.0303e9,
    "llama3.1-70b": 70.554e9,
    "mistral-7b": 7.2417e9,
    "qwen3-0.6b": 0.59605e9,
    "qwen3-8b": 8.1907e9,
    "gemma-2b": 2.5062e9,
    "mixtral-8x7b": 46.703e9,
    "qwen3-30b-a3b": 30.532e9,
    "bert-base": 109.48e6,
    "bert-large": 335.14e6,
    "t5-small": 60.51e6,
    "t5-base": 222.90e6,
    "t5-large": 737.67e6,
    "flan-t5-base": 247.58e6,
}
FULL_SIZE = sorted(n for n in zoo.list_models() if not n.startswith(("tiny-", "small-")))
DECODERS = [n for n in FULL_SIZE if zoo.config(n).family in ("gpt2", "llama", "moe")]


def test_published_presets_exist():
    assert set(PUBLISHED) <= set(FULL_SIZE), set(PUBLISHED) - set(FULL_SIZE)


@pytest.mark.parametrize("name", FULL_SIZE)
def test_param_count_matches_published(name):
    count = zoo.param_count(zoo.config(name))  # traced with jax.eval_shape: nothing is allocated
    assert count > 0
    if name in PUBLISHED:
        assert abs(count - PUBLISHED[name]) <= 1e-3 * PUBLISHED[name], f"{name}: {count:,} vs {PUBLISHED[name]:,.0f}"


def test_gpt3_175b_matches_formula():
    """GPT-3's "175B" is rounded: check the exact dense-transformer formula, and 175e9 within 0.3%."""
    cfg = zoo.config("gpt3-175b")
    L, D, V, P = cfg.num_layers, cfg.hidden_size, cfg.vocab_size, cfg.max_seq_len
    assert cfg.intermediate_size == 4 * D
    formula = 12 * L * D**2 + 13 * L * D + V * D + P * D + 2 * D
    count = zoo.param_count(cfg)
    assert count == formula
    assert abs(count - 175e9) <= 3e-3 * 175e9


@pytest.mark.torch
@pytest.mark.parametrize("name", DECODERS)
def test_hf_config_builds_same_param_count(name):
    """An independent check of config_to_hf: transformers' own class, built on the meta device."""
    import torch  # imported here: the JAX-only CI leg collects this file without torch
    import transformers

    import zoo.hf

    cfg = zoo.config(name)
    hf = zoo.hf.config_to_hf(cfg)
    hf_config = transformers.AutoConfig.for_model(**hf)
    with torch.device("meta"):
        model = getattr(transformers, hf["architectures"][0])(hf_config)
    hf_count = sum(p.numel() for p in model.parameters())  # tied tensors are counted once
    assert hf_count == zoo.param_count(cfg), name
