"""GPT-2 beyond the contract suite: checkpoints in the OpenAI-era layout."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import zoo

from hf_utils import random_batch, torch_logits


@pytest.mark.torch
def test_legacy_checkpoint_layout(hf_checkpoint, tmp_path):
    """OpenAI-era GPT-2 files: no `transformer.` prefix and attn.bias/masked_bias buffers saved."""
    torch_model, src = hf_checkpoint("gpt2")
    tensors = {k.removeprefix("transformer."): v for k, v in load_file(src / "model.safetensors").items()}
    for i in range(torch_model.config.n_layer):
        tensors[f"h.{i}.attn.bias"] = np.tril(np.ones((1, 1, 128, 128), np.float32))
        tensors[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_bytes((src / "config.json").read_bytes())
    model, params = zoo.from_hf(tmp_path / "config.json")  # a path to config.json works too
    ids, mask = random_batch(2, 8, seed=7)
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(ids, jnp.int32)))
    assert float(np.abs(ours - torch_logits(torch_model, ids))[mask.astype(bool)].max()) <= 1e-4
