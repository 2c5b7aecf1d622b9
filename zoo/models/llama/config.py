"""Llama-family configuration (Llama 2/3, Mistral, Qwen2/3, Gemma 1) and presets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from zoo.configs import TINY, ModelConfig


@dataclass(frozen=True, kw_only=True)
class LlamaConfig(ModelConfig):
    """Llama-style decoders: Llama 2/3, Mistral, Qwen2/3, Gemma through switches."""

    family: ClassVar[str] = "llama"

    architecture: str = "LlamaForCausalLM"  # the HF class this config round-trips as
    rope_theta: float = 10000.0
    # Llama-3 frequency scaling: (factor, low_freq_factor, high_freq_factor, original_max_position)
    rope_scaling: tuple[float, float, float, int] | None = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    sliding_window: int | None = None  # Mistral: each query sees the last W keys
    attention_bias: bool = False  # Qwen2: biases on q, k, v
    qk_norm: bool = False  # Qwen3: RMSNorm on q and k per head before RoPE
    norm_offset: bool = False  # Gemma: RMSNorm scales by (1 + w)
    embed_scale: bool = False  # Gemma: embeddings times sqrt(hidden_size)
    hidden_act: str = "silu"  # gate activation: silu (SwiGLU) or gelu_tanh (GeGLU)

    ARCHITECTURES: ClassVar[tuple[str, ...]] = (
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
        "GemmaForCausalLM",
    )

    def __post_init__(self):
        super().__post_init__()
        if self.architecture not in self.ARCHITECTURES:
            raise ValueError(f"{self.name}: architecture {self.architecture!r} is not one of {self.ARCHITECTURES}")
        if self.hidden_act not in ("silu", "gelu_tanh"):
            raise ValueError(f"{self.name}: hidden_act must be 'silu' or 'gelu_tanh', got {self.hidden_act!r}")
        if self.head_dim % 2:
            raise ValueError(f"{self.name}: RoPE needs an even head_dim, got {self.head_dim}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"{self.name}: sliding_window must be positive, got {self.sliding_window}")

    @property
    def hf_architecture(self) -> str:  # type: ignore[override]
        return self.architecture


_LLAMA3 = dict(vocab_size=128256, rope_theta=500000.0, rms_norm_eps=1e-5, max_seq_len=131072)

PRESETS = (
    LlamaConfig(name="llama3.2-1b", hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8,
        intermediate_size=8192, tie_word_embeddings=True, rope_scaling=(32.0, 1.0, 4.0, 8192),
        **_LLAMA3),
    LlamaConfig(name="llama3.2-3b", hidden_size=3072, num_layers=28, num_heads=24, num_kv_heads=8,
        intermediate_size=8192, tie_word_embeddings=True, rope_scaling=(32.0, 1.0, 4.0, 8192),
        **_LLAMA3),
    LlamaConfig(name="llama3.1-8b", hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
        intermediate_size=14336, rope_scaling=(8.0, 1.0, 4.0, 8192), **_LLAMA3),
    LlamaConfig(name="llama3.1-70b", hidden_size=8192, num_layers=80, num_heads=64, num_kv_heads=8,
        intermediate_size=28672, rope_scaling=(8.0, 1.0, 4.0, 8192), **_LLAMA3),
    LlamaConfig(name="mistral-7b", architecture="MistralForCausalLM", vocab_size=32000, hidden_size=4096,
        num_layers=32, num_heads=32, num_kv_heads=8, intermediate_size=14336, sliding_window=4096,
        max_seq_len=32768, rms_norm_eps=1e-5),
    LlamaConfig(name="qwen3-0.6b", architecture="Qwen3ForCausalLM", vocab_size=151936, hidden_size=1024,
        num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128, intermediate_size=3072,
        qk_norm=True, tie_word_embeddings=True, rope_theta=1000000.0, rms_norm_eps=1e-6,
        max_seq_len=40960),
    LlamaConfig(name="qwen3-8b", architecture="Qwen3ForCausalLM", vocab_size=151936, hidden_size=4096,
        num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128, intermediate_size=12288,
        qk_norm=True, rope_theta=1000000.0, rms_norm_eps=1e-6, max_seq_len=40960),
    LlamaConfig(name="gemma-2b", architecture="GemmaForCausalLM", vocab_size=256000, hidden_size=2048,
        num_layers=18, num_heads=8, num_kv_heads=1, head_dim=256, intermediate_size=16384,
        hidden_act="gelu_tanh", norm_offset=True, embed_scale=True, tie_word_embeddings=True,
        rms_norm_eps=1e-6, max_seq_len=8192),
    # tiny presets: one per family switch, for tests and CPU runs
    LlamaConfig(name="tiny-llama", num_kv_heads=2, rope_scaling=(8.0, 1.0, 4.0, 64), **TINY),
    LlamaConfig(name="tiny-mistral", architecture="MistralForCausalLM", num_kv_heads=2, sliding_window=16,
        **TINY),
    LlamaConfig(name="tiny-qwen2", architecture="Qwen2ForCausalLM", num_kv_heads=2, attention_bias=True,
        tie_word_embeddings=True, rms_norm_eps=1e-6, **TINY),
    LlamaConfig(name="tiny-qwen3", architecture="Qwen3ForCausalLM", num_kv_heads=2, head_dim=32,
        qk_norm=True, tie_word_embeddings=True, rms_norm_eps=1e-6, **TINY),
    LlamaConfig(name="tiny-gemma", architecture="GemmaForCausalLM", num_kv_heads=1, head_dim=32,
        hidden_act="gelu_tanh", norm_offset=True, embed_scale=True, tie_word_embeddings=True,
        rms_norm_eps=1e-6, **TINY),
    # The embedded default run: a small Llama that learns on 2 CPU cores in minutes.
    LlamaConfig(name="small-llama", vocab_size=2048, hidden_size=256, num_layers=4, num_heads=4,
        num_kv_heads=2, intermediate_size=768, max_seq_len=512, dtype="float32",
        tie_word_embeddings=True),
)
