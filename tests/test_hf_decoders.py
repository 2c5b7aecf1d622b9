"""HF <-> zoo conversion for the decoder families: logits parity with PyTorch, bit-exact
round trips through `zoo.to_hf`, sharded and bf16 checkpoints, clear errors, atomic export.

Every checkpoint is a tiny seeded random model built locally with transformers.
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

import torch
import transformers
from safetensors.numpy import load_file as np_load_file
from safetensors.torch import load_file

import zoo
import zoo.hf
from hf_utils import (FAMILIES, TENSOR_DAMAGE, check_damaged_checkpoint, check_to_hf_is_atomic, copy_checkpoint,
                      edit_config, make_model, random_batch, save, torch_logits)

# Needs PyTorch at import: conftest leaves this file out where torch is missing and the
# marker expression excludes "torch" (the JAX-only CI leg).
pytestmark = pytest.mark.torch

PARITY_ATOL = 1e-4  # float32 import vs PyTorch
ROUND_TRIP_ATOL = 1e-5  # exported checkpoint reloaded in transformers vs the original


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> (torch model, checkpoint dir), built once per module."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for family in FAMILIES:
        model = make_model(family)
        save(model, root / family)
        out[family] = (model, root / family)
    return out


def zoo_logits(model, params, ids, mask=None):
    return np.asarray(model.apply({"params": params}, jnp.asarray(ids, jnp.int32),
                                  None if mask is None else jnp.asarray(mask, jnp.int32)))


def max_err_on_tokens(a, b, mask):
    return float(np.abs(a - b)[mask.astype(bool)].max())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_torch(checkpoints, family):
    torch_model, path = checkpoints[family]
    model, params = zoo.from_hf(path)
    assert model.cfg.hf_architecture == torch_model.config.architectures[0]
    assert model.cfg.name == path.name and model.cfg.dtype == model.cfg.param_dtype == "float32"
    for leaf in _leaves(params):
        assert isinstance(leaf, jnp.ndarray) and leaf.dtype == jnp.float32  # plain arrays, not boxed
    for pad, side in ((False, "left"), (True, "right"), (True, "left")):
        ids, mask = random_batch(3, 12, seed=1, pad=pad, side=side)
        expected = torch_logits(torch_model, ids, mask)
        err = max_err_on_tokens(zoo_logits(model, params, ids, mask), expected, mask)
        print(f"{family} pad={pad} side={side}: max abs logit error {err:.2e}")  # shown with -s
        assert err <= PARITY_ATOL, f"{family} pad={pad} side={side}: max abs logit error {err}"
    # Left padding precedes real tokens, so the check above can fail: ignoring the mask
    # lets real tokens attend to the padding and moves their logits far past the tolerance.
    unmasked = max_err_on_tokens(zoo_logits(model, params, ids), expected, mask)
    print(f"{family}: left-padded logits without the mask differ by {unmasked:.2e}")
    assert unmasked > 1e-2, f"{family}: the padding does not affect real tokens ({unmasked})"


def test_mistral_sliding_window_is_active(checkpoints):
    """The Mistral parity test is only meaningful if the window (4 < 12 tokens) changes logits."""
    torch_model, path = checkpoints["mistral"]
    wide = make_model("mistral", sliding_window=None)
    ids, mask = random_batch(2, 12, seed=2)
    assert np.abs(torch_logits(wide, ids) - torch_logits(torch_model, ids)).max() > 1e-2
    model, params = zoo.from_hf(path)
    assert model.cfg.sliding_window == 4


@pytest.mark.parametrize("family", list(FAMILIES))
def test_round_trip_bit_exact(checkpoints, family, tmp_path):
    torch_model, path = checkpoints[family]
    model, params = zoo.from_hf(path)
    out = tmp_path / "export"
    zoo.to_hf(model, params, out)
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["export"]  # no temp dir left behind

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert type(reloaded) is type(torch_model)
    original, exported = torch_model.state_dict(), reloaded.state_dict()
    assert sorted(original) == sorted(exported)
    for key, tensor in original.items():
        assert exported[key].dtype == tensor.dtype, key
        assert torch.equal(exported[key], tensor), f"{family}: {key} differs after the round trip"
    ids, mask = random_batch(3, 12, seed=3, pad=True)
    err = max_err_on_tokens(torch_logits(reloaded, ids, mask), torch_logits(torch_model, ids, mask), mask)
    assert err <= ROUND_TRIP_ATOL

    # The file itself holds exactly the checkpoint's tensors (tied heads written once).
    assert sorted(load_file(out / "model.safetensors")) == sorted(load_file(path / "model.safetensors"))
    _, params2 = zoo.from_hf(out)
    for a, b in zip(_leaves(params), _leaves(params2)):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_config_round_trip_for_every_preset():
    """config_from_hf(config_to_hf(cfg)) gives cfg back: train.py's `--model config.json` path."""
    names = [n for n in zoo.list_models() if zoo.config(n).family in ("gpt2", "llama")]
    assert {"tiny-gpt2", "tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-qwen3", "tiny-gemma"} <= set(names)
    for name in names:
        cfg = zoo.config(name)
        hf = zoo.hf.config_to_hf(cfg)
        assert hf["architectures"] == [cfg.hf_architecture] and hf["model_type"]
        back = zoo.hf.config_from_hf(json.loads(json.dumps(hf)), name=name)
        assert back == cfg.replace(dtype="bfloat16", param_dtype="float32"), name  # zoo default dtypes


def test_config_legacy_spellings(checkpoints):
    """Configs written by transformers<5 (top-level rope_theta/rope_scaling, Gemma's "gelu")
    translate like the current spelling."""
    for family in ("llama", "gemma"):
        current = json.loads((checkpoints[family][1] / "config.json").read_text())
        legacy = {k: v for k, v in current.items() if k != "rope_parameters"}
        rope = dict(current["rope_parameters"])
        legacy["rope_theta"] = rope.pop("rope_theta")
        legacy["rope_scaling"] = None if rope["rope_type"] == "default" else {**rope, "type": rope.pop("rope_type")}
        if family == "gemma":
            legacy["hidden_act"] = "gelu"
        assert zoo.hf.config_from_hf(legacy) == zoo.hf.config_from_hf(current)
    cfg = zoo.hf.config_from_hf(current, dtype=jnp.float32)
    assert cfg.hidden_act == "gelu_tanh" and cfg.norm_offset and cfg.dtype == cfg.param_dtype == "float32"


def test_config_missing_field_is_a_clear_error():
    with pytest.raises(zoo.hf.CheckpointError, match="hidden_size"):
        zoo.hf.config_from_hf({"architectures": ["LlamaForCausalLM"], "vocab_size": 8})


def test_sharded_checkpoint(tmp_path):
    torch_model = make_model("llama", seed=4)
    save(torch_model, tmp_path, max_shard_size="50KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (tmp_path / "model.safetensors").exists()
    model, params = zoo.from_hf(tmp_path)
    ids, mask = random_batch(2, 10, seed=5, pad=True)
    err = max_err_on_tokens(zoo_logits(model, params, ids, mask), torch_logits(torch_model, ids, mask), mask)
    assert err <= PARITY_ATOL


def test_from_hf_peak_host_memory_near_checkpoint_size(checkpoints, tmp_path):
    """Streaming import: beside the destination buffers (one checkpoint's worth) only one
    tensor is in host memory at a time. tracemalloc sees numpy's allocations."""
    import gc
    import tracemalloc

    config = transformers.LlamaConfig(vocab_size=4096, hidden_size=384, num_hidden_layers=2, num_attention_heads=6,
                                      num_key_value_heads=2, intermediate_size=1024, max_position_embeddings=128)
    torch.manual_seed(0)
    torch_model = transformers.LlamaForCausalLM(config).float()
    save(torch_model, tmp_path)
    size = (tmp_path / "model.safetensors").stat().st_size
    assert 20e6 < size < 40e6
    largest = max(p.numel() * 4 for p in torch_model.parameters())  # embed_tokens, lm_head: 6.3 MB
    zoo.from_hf(checkpoints["llama"][1])  # lazy imports and tracing caches are not the loader's memory
    gc.collect()
    tracemalloc.start()
    try:
        model, params = zoo.from_hf(tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    print(f"from_hf peak {peak / 1e6:.1f} MB for a {size / 1e6:.1f} MB checkpoint: {peak / size:.2f}x")
    expected = torch_model.state_dict()["lm_head.weight"].numpy()
    assert np.array_equal(np.asarray(params["lm_head"]["kernel"]).T, expected)  # it did load
    assert peak <= 1.5 * size, f"peak {peak / size:.2f}x the checkpoint"
    # Two tensors in flight (the adjacent lm_head and embed_tokens) would exceed this.
    assert peak <= size + largest + 0.1 * size, f"peak {peak / size:.2f}x the checkpoint"


def test_bfloat16_checkpoint(tmp_path):
    """bf16 tensors (which numpy's safetensors reader cannot return) load exactly and export bit-exactly."""
    torch_model = make_model("qwen3", seed=6).to(torch.bfloat16)
    save(torch_model, tmp_path / "bf16")
    model32, params32 = zoo.from_hf(tmp_path / "bf16", dtype=jnp.float32)
    expected = torch_model.state_dict()["model.layers.1.self_attn.q_proj.weight"].float().numpy()
    got = np.asarray(params32["layers"]["attn"]["q_proj"]["kernel"][1])
    assert np.array_equal(got.reshape(got.shape[0], -1).T, expected)

    model16, params16 = zoo.from_hf(tmp_path / "bf16", dtype=jnp.bfloat16)
    assert model16.cfg.dtype == model16.cfg.param_dtype == "bfloat16"
    assert all(leaf.dtype == jnp.bfloat16 for leaf in _leaves(params16))
    zoo.to_hf(model16, params16, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    exported, original = load_file(tmp_path / "out" / "model.safetensors"), load_file(tmp_path / "bf16" / "model.safetensors")
    assert sorted(exported) == sorted(original)
    for key in original:
        assert exported[key].dtype == torch.bfloat16 and torch.equal(exported[key], original[key]), key


def test_gpt2_legacy_checkpoint_layout(checkpoints, tmp_path):
    """OpenAI-era GPT-2 files: no `transformer.` prefix and attn.bias/masked_bias buffers saved."""
    from safetensors.numpy import save_file as np_save_file

    torch_model, src = checkpoints["gpt2"]
    tensors = {k.removeprefix("transformer."): v for k, v in np_load_file(src / "model.safetensors").items()}
    for i in range(torch_model.config.n_layer):
        tensors[f"h.{i}.attn.bias"] = np.tril(np.ones((1, 1, 128, 128), np.float32))
        tensors[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    np_save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_bytes((src / "config.json").read_bytes())
    model, params = zoo.from_hf(tmp_path / "config.json")  # a path to config.json works too
    ids, mask = random_batch(2, 8, seed=7)
    assert max_err_on_tokens(zoo_logits(model, params, ids), torch_logits(torch_model, ids), mask) <= PARITY_ATOL


# --- errors ------------------------------------------------------------------------------

@pytest.fixture
def llama_dir(checkpoints, tmp_path):
    """A private copy of the tiny Llama checkpoint that a test may damage."""
    return copy_checkpoint(checkpoints["llama"][1], tmp_path / "llama")


def test_error_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        zoo.from_hf(tmp_path)


def test_error_unknown_architecture(llama_dir):
    edit_config(llama_dir, architectures=["FancyNewForCausalLM"])
    with pytest.raises(zoo.hf.CheckpointError) as e:
        zoo.from_hf(llama_dir)
    msg = str(e.value)
    assert "FancyNewForCausalLM" in msg and "config.json" in msg
    for arch in ("GPT2LMHeadModel", "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                 "Qwen3ForCausalLM", "GemmaForCausalLM"):
        assert arch in msg


@pytest.mark.parametrize("changes, needle", [
    (dict(rope_parameters=dict(rope_type="yarn", factor=4.0, rope_theta=1e4), rope_scaling=None), "yarn"),
    (dict(hidden_act="relu2"), "relu2"),
    (dict(mlp_bias=True), "mlp_bias"),
])
def test_error_unsupported_config_feature(llama_dir, changes, needle):
    edit_config(llama_dir, **changes)
    with pytest.raises(zoo.hf.CheckpointError, match=needle):
        zoo.from_hf(llama_dir)


@pytest.mark.parametrize("kind", TENSOR_DAMAGE)
def test_error_damaged_tensor_names_file_and_key(checkpoints, tmp_path, kind):
    """Missing, unexpected, mis-shaped (k_proj is [K*H, D] = [32, 64]) and truncated tensors."""
    check_damaged_checkpoint(checkpoints["llama"][1], tmp_path, kind, "model.layers.1.self_attn.k_proj.weight")


def _header_of(data: bytes) -> tuple[int, bytes]:
    n = int.from_bytes(data[:8], "little")
    return n, data[8:8 + n]


@pytest.mark.parametrize("garbage, needle", [
    # the length is right, the JSON is not
    (lambda d: d[:8] + b"{" + b"x" * (_header_of(d)[0] - 1) + d[8 + _header_of(d)[0]:], "invalid JSON"),
    # valid JSON of the right length, but not a header (a list, not a dict of tensors)
    (lambda d: d[:8] + b"[1, 2]".ljust(_header_of(d)[0]) + d[8 + _header_of(d)[0]:], "header"),
    # a header length of 1e15 bytes, far past the end of the file
    (lambda d: (10 ** 15).to_bytes(8, "little") + d[8:], "header too large"),
    # not even the 8-byte length
    (lambda d: d[:5], "header too small"),
])
def test_error_garbage_header_names_the_file(llama_dir, garbage, needle):
    file = llama_dir / "model.safetensors"
    file.write_bytes(garbage(file.read_bytes()))
    with pytest.raises(zoo.hf.CheckpointError) as e:
        zoo.from_hf(llama_dir)
    msg = str(e.value)
    assert str(file) in msg and "cannot read safetensors file" in msg and needle in msg, msg


def test_error_untied_head_that_should_be_tied(checkpoints, tmp_path):
    """A tied model's lm_head.weight may be present only if it equals the embedding."""
    _, src = checkpoints["qwen2"]
    tensors = np_load_file(src / "model.safetensors")
    from safetensors.numpy import save_file as np_save_file

    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
    (tmp_path / "config.json").write_bytes((src / "config.json").read_bytes())
    np_save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    zoo.from_hf(tmp_path)  # equal: fine
    tensors["lm_head.weight"][0, 0] += 1.0
    np_save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(zoo.hf.CheckpointError, match="lm_head.weight"):
        zoo.from_hf(tmp_path)


# --- atomic export -----------------------------------------------------------------------

def test_to_hf_is_atomic(checkpoints, tmp_path, monkeypatch):
    model, params = zoo.from_hf(checkpoints["gpt2"][1])
    check_to_hf_is_atomic(model, params, tmp_path, monkeypatch)


def _leaves(tree):
    import jax

    return jax.tree.leaves(tree)
