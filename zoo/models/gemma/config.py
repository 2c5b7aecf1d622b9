"""Gemma 2 / Gemma 3 (text) configuration and presets.

Both run on the Llama decoder (zoo/models/llama/model.py) through its switches: (1 + w)
RMSNorms before and after attention and the MLP ("sandwich"), sqrt(D)-scaled embeddings,
GeGLU, a tied head, logits scaled by query_pre_attn_scalar ** -0.5 and alternating
sliding-window (local) and global layers. Gemma 2 adds attention and final logit soft caps;
Gemma 3 adds per-head q/k norms, 5 local : 1 global layers and a separate RoPE base
(and linear RoPE scaling on the global layers of 4B and up).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from zoo.configs import TINY
from zoo.models.llama.config import LlamaConfig


def alternating(num_layers: int, period: int) -> tuple[str, ...]:
    """HF's default layer_types: every `period`-th layer global, the others sliding."""
    return tuple("sliding_attention" if (i + 1) % period else "full_attention" for i in range(num_layers))


@dataclass(frozen=True, kw_only=True)
class GemmaConfig(LlamaConfig):
    """Gemma2ForCausalLM / Gemma3ForCausalLM (the text model of Gemma 3)."""

    family: ClassVar[str] = "gemma"
    ARCHITECTURES: ClassVar[tuple[str, ...]] = ("Gemma2ForCausalLM", "Gemma3ForCausalLM")

    architecture: str = "Gemma2ForCausalLM"
    hidden_act: str = "gelu_tanh"
    norm_offset: bool = True
    embed_scale: bool = True
    tie_word_embeddings: bool = True
    norm_placement: str = "sandwich"
    rms_norm_eps: float = 1e-6

    def __post_init__(self):
        super().__post_init__()
        gemma3 = self.architecture == "Gemma3ForCausalLM"
        if self.qk_norm != gemma3 or (not gemma3 and self.rope_local_theta is not None):
            raise ValueError(f"{self.name}: q/k norms and a local RoPE base are Gemma 3's (qk_norm={gemma3})")
        if not (self.norm_offset and self.embed_scale and self.norm_placement == "sandwich"):
            raise ValueError(f"{self.name}: Gemma needs norm_offset, embed_scale and sandwich norms")


def _gemma2(name, hidden, layers, heads, kv, head_dim, ffn, scalar):
    return GemmaConfig(name=name, vocab_size=256000, hidden_size=hidden, num_layers=layers, num_heads=heads,
                       num_kv_heads=kv, head_dim=head_dim, intermediate_size=ffn, query_pre_attn_scalar=scalar,
                       sliding_window=4096, layer_types=alternating(layers, 2), attn_logit_softcap=50.0,
                       final_logit_softcap=30.0, max_seq_len=8192)


def _gemma3(name, hidden, layers, heads, kv, head_dim, ffn, scalar, window=1024, scaling=(8.0,), vocab=262208,
            max_seq_len=131072):
    return GemmaConfig(name=name, architecture="Gemma3ForCausalLM", vocab_size=vocab, hidden_size=hidden,
                       num_layers=layers, num_heads=heads, num_kv_heads=kv, head_dim=head_dim, intermediate_size=ffn,
                       query_pre_attn_scalar=scalar, sliding_window=window, layer_types=alternating(layers, 6),
                       qk_norm=True, rope_theta=1_000_000.0, rope_local_theta=10_000.0, rope_scaling=scaling,
                       max_seq_len=max_seq_len)


PRESETS = (
    _gemma2("gemma2-2b", 2304, 26, 8, 4, 256, 9216, 256.0),
    _gemma2("gemma2-9b", 3584, 42, 16, 8, 256, 14336, 256.0),
    _gemma2("gemma2-27b", 4608, 46, 32, 16, 128, 36864, 144.0),
    _gemma3("gemma3-1b", 1152, 26, 4, 1, 256, 6912, 256.0, window=512, scaling=None, vocab=262144,
            max_seq_len=32768),
    _gemma3("gemma3-4b", 2560, 34, 8, 4, 256, 10240, 256.0),
    _gemma3("gemma3-12b", 3840, 48, 16, 8, 256, 15360, 256.0),
    _gemma3("gemma3-27b", 5376, 62, 32, 16, 128, 21504, 168.0),
    # tiny presets: a window shorter than test sequences, both layer kinds, Gemma 3's pattern
    GemmaConfig(name="tiny-gemma2", num_kv_heads=2, head_dim=32, query_pre_attn_scalar=24.0, sliding_window=8,
                layer_types=alternating(2, 2), attn_logit_softcap=20.0, final_logit_softcap=10.0, **TINY),
    GemmaConfig(name="tiny-gemma3", architecture="Gemma3ForCausalLM", num_kv_heads=1, head_dim=32,
                query_pre_attn_scalar=32.0, sliding_window=8, qk_norm=True, rope_theta=1_000_000.0,
                rope_local_theta=10_000.0, rope_scaling=(8.0,), **{**TINY, "num_layers": 3},
                layer_types=("sliding_attention", "sliding_attention", "full_attention")),
)
