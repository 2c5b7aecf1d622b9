"""HF checkpoint files whatever the family: sharded (indexed) and bf16 checkpoints, streaming
import's peak host memory, unreadable files. Built from the tiny Llama/Qwen3 checkpoints.
"""

from __future__ import annotations

import gc
import json
import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from zoo.hf.rules import CheckpointError

from hf_utils import copy_checkpoint, make_model, random_batch, save, torch_logits

PARITY_ATOL = 1e-4  # float32 import vs PyTorch


@pytest.mark.torch
def test_sharded_checkpoint(tmp_path):
    torch_model = make_model("llama", seed=4)
    save(torch_model, tmp_path, max_shard_size="50KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (tmp_path / "model.safetensors").exists()
    model, params = zoo.from_hf(tmp_path)
    ids, mask = random_batch(2, 10, seed=5, pad=True)
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)))
    err = float(np.abs(ours - torch_logits(torch_model, ids, mask))[mask.astype(bool)].max())
    assert err <= PARITY_ATOL


@pytest.mark.torch
def test_from_hf_peak_host_memory_near_checkpoint_size(hf_checkpoint, tmp_path):
    """Streaming import: beside the destination buffers (one checkpoint's worth) only one
    tensor is in host memory at a time. tracemalloc sees numpy's allocations."""
    import torch
    import transformers

    config = transformers.LlamaConfig(vocab_size=4096, hidden_size=384, num_hidden_layers=2, num_attention_heads=6,
                                      num_key_value_heads=2, intermediate_size=1024, max_position_embeddings=128)
    torch.manual_seed(0)
    torch_model = transformers.LlamaForCausalLM(config).float()
    save(torch_model, tmp_path)
    size = (tmp_path / "model.safetensors").stat().st_size
    assert 20e6 < size < 40e6
    largest = max(p.numel() * 4 for p in torch_model.parameters())  # embed_tokens, lm_head: 6.3 MB
    zoo.from_hf(hf_checkpoint("llama")[1])  # lazy imports and tracing caches are not the loader's memory
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


@pytest.mark.torch
def test_bfloat16_checkpoint(tmp_path):
    """bf16 tensors (which numpy's safetensors reader cannot return) load exactly and export bit-exactly."""
    import torch
    from safetensors.torch import load_file

    torch_model = make_model("qwen3", seed=6).to(torch.bfloat16)
    save(torch_model, tmp_path / "bf16")
    _, params32 = zoo.from_hf(tmp_path / "bf16", dtype=jnp.float32)
    expected = torch_model.state_dict()["model.layers.1.self_attn.q_proj.weight"].float().numpy()
    got = np.asarray(params32["layers"]["attn"]["q_proj"]["kernel"][1])
    assert np.array_equal(got.reshape(got.shape[0], -1).T, expected)

    model16, params16 = zoo.from_hf(tmp_path / "bf16", dtype=jnp.bfloat16)
    assert model16.cfg.dtype == model16.cfg.param_dtype == "bfloat16"
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(params16))
    zoo.to_hf(model16, params16, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    exported = load_file(tmp_path / "out" / "model.safetensors")
    original = load_file(tmp_path / "bf16" / "model.safetensors")
    assert sorted(exported) == sorted(original)
    for key in original:
        assert exported[key].dtype == torch.bfloat16 and torch.equal(exported[key], original[key]), key


def test_missing_config_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        zoo.from_hf(tmp_path)


def _header_of(data: bytes) -> tuple[int, bytes]:
    n = int.from_bytes(data[:8], "little")
    return n, data[8:8 + n]


@pytest.mark.torch
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
def test_garbage_header_names_the_file(hf_checkpoint, tmp_path, garbage, needle):
    path = copy_checkpoint(hf_checkpoint("llama")[1], tmp_path / "llama")
    file = path / "model.safetensors"
    file.write_bytes(garbage(file.read_bytes()))
    with pytest.raises(CheckpointError) as e:
        zoo.from_hf(path)
    msg = str(e.value)
    assert str(file) in msg and "cannot read safetensors file" in msg and needle in msg, msg
