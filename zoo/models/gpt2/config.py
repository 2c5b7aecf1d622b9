"""GPT-2 configuration and presets (OpenAI sizes; GPT-3 175B as the same architecture)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from zoo.configs import TINY, ModelConfig


@dataclass(frozen=True, kw_only=True)
class GPT2Config(ModelConfig):
    """GPT-2: learned positions, pre-LayerNorm, GELU MLP, biases everywhere, tied head."""

    family: ClassVar[str] = "gpt2"
    hf_architecture: ClassVar[str] = "GPT2LMHeadModel"
    mlp_matrices: ClassVar[int] = 2

    layer_norm_epsilon: float = 1e-5

    def __post_init__(self):
        super().__post_init__()
        if self.num_kv_heads != self.num_heads:
            raise ValueError(f"{self.name}: GPT-2 has no grouped-query attention (num_kv_heads must equal num_heads)")


PRESETS = (
    # OpenAI sizes; vocab 50257, context 1024.
    *(GPT2Config(name=name, vocab_size=50257, hidden_size=d, num_layers=layers, num_heads=heads,
                 intermediate_size=4 * d, max_seq_len=1024)
      for name, d, layers, heads in (("gpt2-124m", 768, 12, 12), ("gpt2-350m", 1024, 24, 16),
                                      ("gpt2-774m", 1280, 36, 20), ("gpt2-1.5b", 1600, 48, 25))),
    # GPT-3 175B: the GPT-2 architecture at GPT-3 scale (dense attention everywhere).
    GPT2Config(name="gpt3-175b", vocab_size=50257, hidden_size=12288, num_layers=96, num_heads=96,
        intermediate_size=4 * 12288, max_seq_len=2048),
    GPT2Config(name="tiny-gpt2", **TINY),
)
