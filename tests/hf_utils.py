"""Tiny random Hugging Face checkpoints built locally (no downloads) for parity tests.

Import only from tests marked `torch`: it imports torch and transformers.
"""

from __future__ import annotations

import numpy as np
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


def random_batch(batch: int, length: int, seed: int = 0, pad: bool = False):
    """int64 token ids [B, T] and a right-padded attention mask (row b keeps T - 2b tokens)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, size=(batch, length)).astype(np.int64)
    mask = np.ones((batch, length), np.int64)
    if pad:
        for b in range(1, batch):
            mask[b, length - 2 * b:] = 0
    return ids, mask


def torch_logits(model, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Logits [B, T, V] from the PyTorch model, float32 numpy."""
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids),
                    attention_mask=None if mask is None else torch.from_numpy(mask))
    return out.logits.float().numpy()
