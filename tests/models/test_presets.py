"""Full-size presets: each builds abstractly (jax.eval_shape, no memory) and has the
published parameter count; for the HF decoder families, transformers builds the same
number of parameters (on torch's meta device) from the config that `config_to_hf` writes.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import zoo
from zoo.hf.convert import config_to_hf

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
    "gemma2-2b": 2.6143e9,
    "gemma2-9b": 9.2417e9,
    "gemma2-27b": 27.227e9,
    "gemma3-1b": 0.99989e9,
    "olmo2-7b": 7.2986e9,
    "smollm3-3b": 3.0751e9,
    "phi-3-mini": 3.8211e9,
    "phi-4": 14.660e9,
    "phi-4-mini": 3.8360e9,
    "mixtral-8x7b": 46.703e9,
    "qwen3-30b-a3b": 30.532e9,
    "gpt-oss-20b": 20.915e9,  # the hub's bf16 checkpoint counts (the model card: 21B / 117B)
    "gpt-oss-120b": 116.83e9,
    # DeepSeek-V3's 671B is the main model (the release adds a 14B multi-token-prediction layer: "685B")
    "deepseek-v3-671b": 671.0e9,
    "deepseek-v2-lite-16b": 15.706e9,
    "bert-base": 109.48e6,
    "bert-large": 335.14e6,
    # the hub's safetensors counts of the MLM checkpoints (model cards round them to 125M/355M/279M/561M)
    "roberta-base": 124.70e6,
    "roberta-large": 355.41e6,
    "xlm-roberta-base": 278.30e6,
    "xlm-roberta-large": 560.14e6,
    "modernbert-base": 149.66e6,  # the MLM checkpoints on the hub (149M / 395M)
    "modernbert-large": 395.88e6,
    "t5-small": 60.51e6,
    "t5-base": 222.90e6,
    "t5-large": 737.67e6,
    "flan-t5-base": 247.58e6,
    # the hub's safetensors counts (mT5 paper: 300M / 580M / 1.2B / 3.7B)
    "mt5-small": 300.18e6,
    "mt5-base": 582.40e6,
    "mt5-large": 1229.6e6,
    "mt5-xl": 3742.6e6,
    "umt5-small": 306.60e6,
    "umt5-base": 592.04e6,
    "umt5-xl": 3768.4e6,
}
# Gemma 3 4B and up are published with their vision tower; the text model's figure is the
# technical report's non-embedding count (Table 1, millions) plus the V x D embedding.
PUBLISHED_NON_EMBEDDING = {"gemma3-4b": 3209e6, "gemma3-12b": 10759e6, "gemma3-27b": 25600e6}
FULL_SIZE = sorted(n for n in zoo.list_models() if not n.startswith(("tiny-", "small-")))
DECODERS = [n for n in FULL_SIZE if zoo.config(n).family in ("gpt2", "llama", "gemma", "moe", "deepseek")]


def test_published_presets_exist():
    assert set(PUBLISHED) | set(PUBLISHED_NON_EMBEDDING) <= set(FULL_SIZE)


@pytest.mark.parametrize("name", sorted(PUBLISHED_NON_EMBEDDING))
def test_text_tower_non_embedding_count_matches_published(name):
    cfg = zoo.config(name)
    count = zoo.param_count(cfg) - cfg.vocab_size * cfg.hidden_size  # tied head: one V x D table
    assert abs(count - PUBLISHED_NON_EMBEDDING[name]) <= 1e-3 * PUBLISHED_NON_EMBEDDING[name], (name, count)


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

    cfg = zoo.config(name)
    hf = config_to_hf(cfg)
    hf_config = transformers.AutoConfig.for_model(**hf)
    with torch.device("meta"):
        model = getattr(transformers, hf["architectures"][0])(hf_config)
    hf_count = sum(p.numel() for p in model.parameters())  # tied tensors are counted once
    hf_count += sum(b.numel() for key, b in model.named_buffers() if key.endswith("e_score_correction_bias"))
    assert hf_count == zoo.param_count(cfg), name


# --- configs reject impossible models before anything compiles ------------------------------

_GPT2 = dict(name="bad", vocab_size=64, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128)
_LLAMA = dict(_GPT2, num_kv_heads=2)


@pytest.mark.parametrize("cls, overrides, message", [
    ("GPT2Config", dict(hidden_size=66), "bad: hidden_size=66 is not divisible by num_heads=4; set head_dim"),
    ("GPT2Config", dict(num_kv_heads=2), "bad: GPT-2 has no grouped-query attention"),
    ("GPT2Config", dict(num_heads=0), "bad: num_heads must be positive, got 0"),
    ("GPT2Config", dict(vocab_size=0), "bad: vocab_size must be positive, got 0"),
    ("GPT2Config", dict(max_seq_len=-1), "bad: max_seq_len must be positive, got -1"),
    ("GPT2Config", dict(dtype="float64"), "bad: dtype and param_dtype must be one of"),
    ("GPT2Config", dict(remat="everything"), "bad: remat='everything' is not one of"),
    ("LlamaConfig", dict(num_kv_heads=3), "bad: num_heads=4 must be a multiple of num_kv_heads=3"),
    ("LlamaConfig", dict(num_kv_heads=8), "bad: num_heads=4 must be a multiple of num_kv_heads=8"),
    ("LlamaConfig", dict(num_kv_heads=-2), "bad: num_kv_heads must be positive (or 0 for the default), got -2"),
    ("LlamaConfig", dict(head_dim=-16), "bad: head_dim must be positive (or 0 for the default), got -16"),
    ("LlamaConfig", dict(num_layers=0), "bad: num_layers must be positive, got 0"),
    ("LlamaConfig", dict(intermediate_size=0), "bad: intermediate_size must be positive, got 0"),
    ("LlamaConfig", dict(head_dim=15), "bad: RoPE needs an even head_dim, got 15"),
    ("LlamaConfig", dict(hidden_size=56, num_heads=8), "bad: RoPE needs an even head_dim, got 7"),
    ("LlamaConfig", dict(sliding_window=0), "bad: sliding_window must be positive, got 0"),
    ("LlamaConfig", dict(hidden_act="relu"), "bad: hidden_act must be 'silu' or 'gelu_tanh', got 'relu'"),
    ("LlamaConfig", dict(architecture="PhiForCausalLM"), "bad: architecture 'PhiForCausalLM' is not one of"),
])
def test_decoder_config_rejects_impossible_models(cls, overrides, message):
    """__post_init__ refuses with a message naming the config and the offending field."""
    import re

    from zoo.models.gpt2.config import GPT2Config
    from zoo.models.llama.config import LlamaConfig

    config_cls = {"GPT2Config": GPT2Config, "LlamaConfig": LlamaConfig}[cls]
    base = _GPT2 if cls == "GPT2Config" else _LLAMA
    config_cls(**base)  # the base itself is valid
    with pytest.raises(ValueError, match=re.escape(message)):
        config_cls(**{**base, **overrides})


def test_config_replace_is_revalidated():
    cfg = zoo.config("tiny-llama")
    with pytest.raises(ValueError, match="must be a multiple of num_kv_heads=3"):
        cfg.replace(num_kv_heads=3)


def _readme_models() -> dict[str, str]:
    """preset -> the params cell of README's model table."""
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = text.split("## Models", 1)[1].split("\n\n", 2)[1]
    rows = [line.split("|")[1:-1] for line in section.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): cells[3].strip() for cells in rows[1:]}


@pytest.mark.parametrize("name", FULL_SIZE)
def test_readme_model_table_lists_preset_with_its_count(name):
    cell = _readme_models().get(name)
    assert cell is not None, f"README's model table has no row for {name}"
    m = re.fullmatch(r"([0-9.]+)([MB])", cell)
    assert m, f"{name}: params cell {cell!r} is not like 1.236B"
    value, unit = float(m[1]) * {"M": 1e6, "B": 1e9}[m[2]], {"M": 1e6, "B": 1e9}[m[2]]
    decimals = len(m[1].split(".")[1]) if "." in m[1] else 0
    assert abs(value - zoo.param_count(zoo.config(name))) <= 0.5 * unit * 10 ** -decimals, (name, cell)
