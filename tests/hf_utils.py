"""Tiny random Hugging Face checkpoints built locally (no downloads) for parity tests.

Import only from tests marked `torch`: it imports torch and transformers.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

VOCAB, HIDDEN, LAYERS, HEADS, FFN = 256, 64, 2, 4, 128

_COMMON = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
               intermediate_size=FFN, max_position_embeddings=128)

# name -> (config class, model class, config kwargs). Each exercises its family's switch.
FAMILIES = {
    "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel,
             dict(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=128,
                  bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1)),
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
              dict(**_COMMON, num_key_value_heads=2, rope_theta=500000.0,
                   rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                     original_max_position_embeddings=16))),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM,
                dict(**_COMMON, num_key_value_heads=2, sliding_window=4)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
              dict(**_COMMON, num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
              dict(**_COMMON, num_key_value_heads=2, head_dim=32)),
    "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM,
              dict(**_COMMON, num_key_value_heads=1, head_dim=32)),
}


def make_model(family: str, seed: int = 0, **overrides):
    """A seeded random float32 HF model of `family`, eager attention, in eval mode.

    Weights are re-drawn at a larger scale than HF's init (std 0.02) and norms are
    perturbed away from 1 so that every tensor visibly matters in the parity checks.
    """
    config_cls, model_cls, kwargs = FAMILIES[family]
    config = config_cls(**{**kwargs, **overrides})
    config._attn_implementation = "eager"  # eager masks apply Mistral's sliding window
    torch.manual_seed(seed)
    model = model_cls(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(torch.randn_like(p) * 0.1 + (0.0 if "bias" in name or family == "gemma" else 1.0))
            else:
                p.copy_(torch.randn_like(p) * 0.08)
    return model


def save(model, path, **kwargs) -> None:
    """save_pretrained with safetensors (the default in transformers 5)."""
    model.save_pretrained(path, safe_serialization=True, **kwargs)


def random_batch(batch: int, length: int, seed: int = 0, pad: bool = False, side: str = "left"):
    """int64 token ids [B, T] and an attention mask; with `pad`, row b keeps T - 2b tokens.

    Left padding is the default because it is the one a causal model can get wrong:
    right padding sits after every real token, so no real token could see it even if
    the mask were ignored.
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, size=(batch, length)).astype(np.int64)
    mask = np.ones((batch, length), np.int64)
    if pad:
        for b in range(1, batch):
            if side == "left":
                mask[b, :2 * b] = 0
            else:
                mask[b, length - 2 * b:] = 0
    return ids, mask


def torch_logits(model, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Logits [B, T, V] from the PyTorch model, float32 numpy."""
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids),
                    attention_mask=None if mask is None else torch.from_numpy(mask))
    return out.logits.float().numpy()


# --- damaged checkpoints: the same error checks for every family --------------------------

def copy_checkpoint(src: Path, dst: Path) -> Path:
    """A private copy of a checkpoint dir that a test may damage."""
    shutil.copytree(src, dst)
    return dst


def edit_config(path: Path, **changes) -> None:
    """Overwrites fields of path/config.json."""
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def edit_tensors(path: Path, edit) -> None:
    """Rewrites path/model.safetensors after `edit(tensors)` changed the dict in place."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


TENSOR_DAMAGE = ("missing", "unexpected", "shape", "truncated")


def damage(path: Path, kind: str, key: str) -> list[str]:
    """Damages tensor `key` of the checkpoint at `path` in one way (TENSOR_DAMAGE) and
    returns the strings the loader's error must contain: the file, the key, and what
    went wrong."""
    file = path / "model.safetensors"
    if kind == "missing":
        edit_tensors(path, lambda t: t.pop(key))
        return [str(file), repr(key), "missing"]
    if kind == "unexpected":
        extra = key.rsplit(".", 1)[0] + "_extra.weight"
        edit_tensors(path, lambda t: t.update({extra: np.zeros(3, np.float32)}))
        return [str(file), repr(extra), "unexpected"]
    if kind == "shape":
        old = {}

        def halve_first_axis(tensors):
            old["shape"] = tensors[key].shape
            tensors[key] = np.zeros((old["shape"][0] // 2, *old["shape"][1:]), np.float32)

        edit_tensors(path, halve_first_axis)
        new = (old["shape"][0] // 2, *old["shape"][1:])
        return [str(file), repr(key), f"shape {new}", f"expected {old['shape']}"]
    if kind == "truncated":
        # Cut the file in the middle of `key`'s data: every tensor before it is whole,
        # so `key` is the first one cut off.
        data = file.read_bytes()
        n = int.from_bytes(data[:8], "little")
        begin, end = json.loads(data[8:8 + n])[key]["data_offsets"]
        file.write_bytes(data[:8 + n + (begin + end) // 2])
        return [str(file), repr(key), "truncated"]
    raise ValueError(f"unknown damage {kind!r}")


def check_damaged_checkpoint(src: Path, tmp_path: Path, kind: str, key: str) -> None:
    """A copy of checkpoint `src` with tensor `key` damaged (see `damage`) fails to load
    with a CheckpointError naming the file and the tensor."""
    import zoo
    import zoo.hf

    path = copy_checkpoint(src, tmp_path / f"damaged-{kind}")
    needles = damage(path, kind, key)
    try:
        zoo.from_hf(path)
    except zoo.hf.CheckpointError as e:
        missing = [n for n in needles if n not in str(e)]
        assert not missing, f"{kind}: {missing} not in the error {str(e)!r}"
    else:
        raise AssertionError(f"{kind}: a damaged checkpoint loaded without an error")


def check_to_hf_is_atomic(model, params, tmp_path: Path, monkeypatch) -> None:
    """zoo.to_hf failing midway (a simulated full disk after four tensors) leaves neither a
    half-written target nor a temporary dir, and an existing empty target as it was; a dir
    with files in it is refused before any work and left untouched; a later successful
    export fills the empty target."""
    import zoo
    import zoo.hf
    from zoo.paths import OutputError

    real = zoo.hf._hf_tensor
    calls = {"n": 0}

    def fail_midway(*args):
        calls["n"] += 1
        if calls["n"] == 5:  # after the header and four tensors are on disk
            raise OSError("disk full (simulated)")
        return real(*args)

    monkeypatch.setattr(zoo.hf, "_hf_tensor", fail_midway)
    root = tmp_path / "atomic"
    root.mkdir()
    with pytest.raises(OSError, match="simulated"):
        zoo.to_hf(model, params, root / "fresh")
    assert calls["n"] == 5
    assert os.listdir(root) == []  # neither the target nor a temp dir

    existing = root / "existing"
    existing.mkdir()
    calls["n"] = 0
    with pytest.raises(OSError, match="simulated"):
        zoo.to_hf(model, params, existing)
    assert os.listdir(root) == ["existing"] and os.listdir(existing) == []

    (existing / "config.json").write_text("old")
    calls["n"] = 0
    with pytest.raises(OutputError, match="not empty"):
        zoo.to_hf(model, params, existing)
    assert calls["n"] == 0  # refused before any work
    assert os.listdir(root) == ["existing"]
    assert os.listdir(existing) == ["config.json"] and (existing / "config.json").read_text() == "old"

    (existing / "config.json").unlink()
    monkeypatch.setattr(zoo.hf, "_hf_tensor", real)  # a successful export fills the empty dir
    zoo.to_hf(model, params, existing)
    assert os.listdir(root) == ["existing"]
    assert sorted(os.listdir(existing)) == ["config.json", "generation_config.json", "model.safetensors"]
