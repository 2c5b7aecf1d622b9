"""The Llama family (Llama, Mistral, Qwen2, Qwen3, Gemma) beyond the contract suite: the
switches each variant turns on, config spellings of older transformers, and what the
importer refuses.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import zoo
from zoo.hf.convert import config_from_hf, config_to_hf
from zoo.hf.rules import CheckpointError

from hf_utils import copy_checkpoint, edit_config, make_model, random_batch, torch_logits


@pytest.mark.torch
def test_mistral_sliding_window_is_active(hf_checkpoint):
    """The Mistral parity check is only meaningful if the window (4 < 12 tokens) changes logits."""
    torch_model, path = hf_checkpoint("mistral")
    wide = make_model("mistral", sliding_window=None)
    ids, _ = random_batch(2, 12, seed=2)
    assert np.abs(torch_logits(wide, ids) - torch_logits(torch_model, ids)).max() > 1e-2
    model, _ = zoo.from_hf(path)
    assert model.cfg.sliding_window == 4


@pytest.mark.torch
def test_config_legacy_spellings(hf_checkpoint):
    """Configs written by transformers<5 (top-level rope_theta/rope_scaling, Gemma's "gelu")
    translate like the current spelling."""
    for name in ("llama", "gemma"):
        current = json.loads((hf_checkpoint(name)[1] / "config.json").read_text())
        legacy = {k: v for k, v in current.items() if k != "rope_parameters"}
        rope = dict(current["rope_parameters"])
        legacy["rope_theta"] = rope.pop("rope_theta")
        legacy["rope_scaling"] = None if rope["rope_type"] == "default" else {**rope, "type": rope.pop("rope_type")}
        if name == "gemma":
            legacy["hidden_act"] = "gelu"
        assert config_from_hf(legacy) == config_from_hf(current)
    cfg = config_from_hf(current, dtype=jnp.float32)
    assert cfg.hidden_act == "gelu_tanh" and cfg.norm_offset and cfg.dtype == cfg.param_dtype == "float32"


def test_config_missing_field_is_a_clear_error():
    with pytest.raises(CheckpointError, match="hidden_size"):
        config_from_hf({"architectures": ["LlamaForCausalLM"], "vocab_size": 8})


@pytest.mark.torch
@pytest.mark.parametrize("changes, needle", [
    (dict(rope_parameters=dict(rope_type="yarn", factor=4.0, rope_theta=1e4), rope_scaling=None), "yarn"),
    (dict(hidden_act="relu2"), "relu2"),
    (dict(mlp_bias=True), "mlp_bias"),
])
def test_unsupported_config_feature(hf_checkpoint, tmp_path, changes, needle):
    path = copy_checkpoint(hf_checkpoint("llama")[1], tmp_path / "llama")
    edit_config(path, **changes)
    with pytest.raises(CheckpointError, match=needle):
        zoo.from_hf(path)


@pytest.mark.torch
def test_untied_head_that_should_be_tied(hf_checkpoint, tmp_path):
    """A tied model's lm_head.weight may be present only if it equals the embedding."""
    src = hf_checkpoint("qwen2")[1]
    tensors = load_file(src / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
    (tmp_path / "config.json").write_bytes((src / "config.json").read_bytes())
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    zoo.from_hf(tmp_path)  # equal: fine
    tensors["lm_head.weight"][0, 0] += 1.0
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        zoo.from_hf(tmp_path)


@pytest.mark.parametrize("preset, changes, needle", [
    ("tiny-mistral", dict(layer_types=("sliding_attention", "full_attention")), "layer_types"),
    ("tiny-llama", dict(rope_scaling=(8.0,)), "linear"),
    ("tiny-mixtral", dict(nope_layers=(1,)), "NoPE"),
    ("tiny-qwen3", dict(norm_placement="post"), "norm_placement"),
])
def test_switch_no_hf_class_has_is_refused_on_export(preset, changes, needle):
    """A config the HF class cannot express is refused, not written without the switch."""
    with pytest.raises(CheckpointError, match=needle):
        config_to_hf(zoo.config(preset, **changes))


@pytest.mark.torch
def test_longrope_switches_factors_past_original_max_like_transformers(hf_checkpoint):
    """Phi-3 LongRoPE on half of each head: short factors while a call stays within
    original_max_position_embeddings (16 here), long ones once it passes; logits equal
    transformers' on both sides of the switch, and the two regimes really differ."""
    import jax.numpy as jnp

    from hf_utils import torch_logits

    hf, path = hf_checkpoint("phi3-longrope")
    model, params = zoo.from_hf(path)
    assert model.cfg.rotary_dim == 8 and model.cfg.rope_scaling[0] == "longrope"
    rng = np.random.default_rng(3)
    for length in (16, 17, 30):
        ids = rng.integers(3, 256, size=(2, length))
        got = np.asarray(model.apply({"params": params}, jnp.asarray(ids)))
        assert float(np.abs(got - torch_logits(hf, ids)).max()) <= 1e-4, length
    ids = jnp.asarray(rng.integers(3, 256, size=(1, 20)))
    short = model.apply({"params": params}, ids[:, :16])
    long = model.apply({"params": params}, ids)[:, :16]  # the same 16 tokens inside a longer call
    assert float(jnp.abs(short - long).max()) > 1e-2
