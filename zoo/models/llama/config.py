"""Llama-family configuration (Llama 2/3, Mistral, Qwen2/3, Gemma 1) and presets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from zoo.configs import TINY, ModelConfig
from zoo.nn.blocks import NORM_PLACEMENTS

LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")  # HF's names


@dataclass(frozen=True, kw_only=True)
class LlamaConfig(ModelConfig):
    """Llama-style decoders: Llama 2/3, Mistral, Qwen2/3, Gemma through switches."""

    family: ClassVar[str] = "llama"

    architecture: str = "LlamaForCausalLM"  # the HF class this config round-trips as
    rope_theta: float = 10000.0
    # (factor,) linear; (factor, low_freq_factor, high_freq_factor, original_max_position) Llama 3;
    # ("yarn", factor, beta_fast, beta_slow, original_max_position, truncate) YaRN;
    # ("longrope", short_factors, long_factors, original_max_position, attention_factor) Phi-3 (zoo/nn/rope.py)
    rope_scaling: tuple | None = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    sliding_window: int | None = None  # Mistral: each query sees the last W keys
    attention_bias: bool = False  # Qwen2: biases on q, k, v
    qk_norm: bool = False  # Qwen3: RMSNorm on q and k per head before RoPE
    norm_offset: bool = False  # Gemma: RMSNorm scales by (1 + w)
    embed_scale: bool = False  # Gemma: embeddings times sqrt(hidden_size)
    hidden_act: str = "silu"  # gate activation: silu (SwiGLU) or gelu_tanh (GeGLU)
    norm_placement: str = "pre"  # "pre", "sandwich" (Gemma 2/3) or "post" (OLMo 2): zoo/nn/blocks.py
    qk_norm_flat: bool = False  # OLMo 2: the q/k norms span the whole projection, not one head
    # Per-layer attention kinds. layer_types[i]: "full_attention", "sliding_attention" (the
    # window is `sliding_window`) or "chunked_attention" (Llama 4: within chunks of
    # `attention_chunk_size`); None: every layer sliding if sliding_window is set (Mistral).
    layer_types: tuple[str, ...] | None = None
    nope_layers: tuple[int, ...] = ()  # SmolLM3: layers without RoPE
    rope_local_theta: float | None = None  # Gemma 3: sliding layers' RoPE base (without rope_scaling)
    query_pre_attn_scalar: float | None = None  # Gemma 2/3: logits scaled by this ** -0.5, not head_dim's
    attn_logit_softcap: float | None = None  # Gemma 2: c * tanh(logits / c)
    final_logit_softcap: float | None = None  # Gemma 2: on the output logits
    partial_rotary_factor: float = 1.0  # Phi-4-mini: RoPE on this fraction of head_dim
    attention_out_bias: bool = False  # GPT-OSS: o_proj has a bias too
    attention_sinks: bool = False  # GPT-OSS: a learned per-head logit in every softmax (kernels.attention)
    attention_chunk_size: int | None = None  # Llama 4: the chunk of "chunked_attention" layers
    qk_l2_norm: bool = False  # Llama 4: q and k RMS-normalised (no weight) after RoPE, RoPE layers only
    # Llama 4: NoPE layers scale q by log1p(floor((i + 1) / floor_scale)) * attn_scale + 1 (i: array index)
    attn_temperature_tuning: bool = False
    floor_scale: int = 8192
    attn_scale: float = 0.1

    ARCHITECTURES: ClassVar[tuple[str, ...]] = (
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
        "GemmaForCausalLM",
        "Olmo2ForCausalLM",
        "SmolLM3ForCausalLM",
        "Phi3ForCausalLM",
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
        if self.norm_placement not in NORM_PLACEMENTS:
            raise ValueError(f"{self.name}: norm_placement must be one of {NORM_PLACEMENTS}, got "
                             f"{self.norm_placement!r}")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_layers or not set(self.layer_types) <= set(LAYER_TYPES):
                raise ValueError(f"{self.name}: layer_types must give one of {LAYER_TYPES} for each of the "
                                 f"{self.num_layers} layers")
            if "sliding_attention" in self.layer_types and self.sliding_window is None:
                raise ValueError(f"{self.name}: sliding_attention layers need sliding_window")
            if "chunked_attention" in self.layer_types and not (self.attention_chunk_size or 0) > 0:
                raise ValueError(f"{self.name}: chunked_attention layers need a positive attention_chunk_size")
        if self.floor_scale <= 0:
            raise ValueError(f"{self.name}: floor_scale must be positive, got {self.floor_scale}")
        if any(not 0 <= i < self.num_layers for i in self.nope_layers):
            raise ValueError(f"{self.name}: nope_layers must be layer indices below {self.num_layers}")
        if isinstance(self.rope_scaling, list):  # JSON gives lists back
            object.__setattr__(self, "rope_scaling", tuple(self.rope_scaling))
        kind = self.rope_scaling[0] if self.rope_scaling is not None and isinstance(self.rope_scaling[0], str) \
            else None
        if self.rope_scaling is not None and not ((kind is None and len(self.rope_scaling) in (1, 4)) or
                                                  (kind == "yarn" and len(self.rope_scaling) == 6) or
                                                  (kind == "longrope" and len(self.rope_scaling) == 5)):
            raise ValueError(f"{self.name}: rope_scaling is (factor,), (factor, low, high, original_max), "
                             "('yarn', factor, beta_fast, beta_slow, original_max, truncate) or "
                             "('longrope', short_factors, long_factors, original_max, attention_factor)")
        rotary = self.rotary_dim
        if rotary % 2 or not 0 < rotary <= self.head_dim:
            raise ValueError(f"{self.name}: partial_rotary_factor {self.partial_rotary_factor} gives {rotary} "
                             f"rotary dims of {self.head_dim}: needs an even number in 2..head_dim")
        if kind == "longrope":
            object.__setattr__(self, "rope_scaling", ("longrope", tuple(map(float, self.rope_scaling[1])),
                                                      tuple(map(float, self.rope_scaling[2])),
                                                      int(self.rope_scaling[3]), float(self.rope_scaling[4])))
            if not len(self.rope_scaling[1]) == len(self.rope_scaling[2]) == rotary // 2:
                raise ValueError(f"{self.name}: LongRoPE needs {rotary // 2} short and long factors")

    def attended_keys(self, seq_len: int) -> float:
        """Llama 4's chunked layers attend within chunks of C tokens (C / 2 keys per query on average)."""
        if not (self.attention_chunk_size and self.layer_types and "chunked_attention" in self.layer_types):
            return super().attended_keys(seq_len)
        share = self.layer_types.count("chunked_attention") / self.num_layers
        return share * min(self.attention_chunk_size, seq_len) / 2.0 + (1 - share) * seq_len / 2.0

    @property
    def rotary_dim(self) -> int:
        """How many leading dims of each head RoPE rotates."""
        return int(self.head_dim * self.partial_rotary_factor)

    def attention_kinds(self) -> tuple[tuple, tuple[int, ...]]:
        """(the distinct (sliding_window, rope_theta, rope_scaling, chunk) of the layers, each layer's
        index into them): what zoo.nn.attention.SelfAttention switches between."""
        per_layer = []
        for i in range(self.num_layers):
            chunk = self.attention_chunk_size if self.layer_types and \
                self.layer_types[i] == "chunked_attention" else None
            sliding = (self.layer_types[i] == "sliding_attention") if self.layer_types else \
                self.sliding_window is not None
            window = self.sliding_window if sliding else None
            if i in self.nope_layers:
                rope = (None, None)
            elif sliding and self.rope_local_theta is not None:
                rope = (self.rope_local_theta, None)
            else:
                rope = (self.rope_theta, self.rope_scaling)
            per_layer.append((window, *rope, chunk))
        kinds = tuple(dict.fromkeys(per_layer))
        return kinds, tuple(kinds.index(k) for k in per_layer)

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
    LlamaConfig(name="olmo2-7b", architecture="Olmo2ForCausalLM", vocab_size=100352, hidden_size=4096,
        num_layers=32, num_heads=32, num_kv_heads=32, intermediate_size=11008, norm_placement="post",
        qk_norm=True, qk_norm_flat=True, rope_theta=500000.0, rms_norm_eps=1e-6, max_seq_len=4096,
        bos_token_id=None, eos_token_id=100257, pad_token_id=100277),
    LlamaConfig(name="smollm3-3b", architecture="SmolLM3ForCausalLM", vocab_size=128256, hidden_size=2048,
        num_layers=36, num_heads=16, num_kv_heads=4, intermediate_size=11008, tie_word_embeddings=True,
        nope_layers=tuple(range(3, 36, 4)), rope_theta=5000000.0, rms_norm_eps=1e-6, max_seq_len=65536,
        bos_token_id=128000, eos_token_id=128012, pad_token_id=128004),
    LlamaConfig(name="phi-3-mini", architecture="Phi3ForCausalLM", vocab_size=32064, hidden_size=3072,
        num_layers=32, num_heads=32, num_kv_heads=32, intermediate_size=8192, sliding_window=2047,
        rms_norm_eps=1e-5, max_seq_len=4096, bos_token_id=1, eos_token_id=32000, pad_token_id=32000),
    LlamaConfig(name="phi-4", architecture="Phi3ForCausalLM", vocab_size=100352, hidden_size=5120,
        num_layers=40, num_heads=40, num_kv_heads=10, intermediate_size=17920, rope_theta=250000.0,
        rms_norm_eps=1e-5, max_seq_len=16384, bos_token_id=100257, eos_token_id=100265, pad_token_id=100351),
    # Phi-4-mini: partial RoPE (3/4 of each head), GQA 24/8, tied 200k vocabulary. Its LongRoPE factors
    # (past 4,096 positions) come with the checkpoint; this preset rotates as Phi-4-mini does up to 4,096.
    LlamaConfig(name="phi-4-mini", architecture="Phi3ForCausalLM", vocab_size=200064, hidden_size=3072,
        num_layers=32, num_heads=24, num_kv_heads=8, intermediate_size=8192, partial_rotary_factor=0.75,
        tie_word_embeddings=True, rms_norm_eps=1e-5, max_seq_len=4096, bos_token_id=199999,
        eos_token_id=199999, pad_token_id=199999),
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
    LlamaConfig(name="tiny-olmo2", architecture="Olmo2ForCausalLM", num_kv_heads=2, norm_placement="post",
        qk_norm=True, qk_norm_flat=True, rms_norm_eps=1e-6, **TINY),
    LlamaConfig(name="tiny-smollm3", architecture="SmolLM3ForCausalLM", num_kv_heads=2, nope_layers=(1,),
        tie_word_embeddings=True, rms_norm_eps=1e-6, **TINY),
    LlamaConfig(name="tiny-phi3", architecture="Phi3ForCausalLM", num_kv_heads=2, sliding_window=16, **TINY),
    LlamaConfig(name="tiny-phi3-longrope", architecture="Phi3ForCausalLM", num_kv_heads=2, partial_rotary_factor=0.5,
        rope_scaling=("longrope", (1.0, 1.2, 1.9, 3.1), (1.4, 3.0, 8.0, 15.0), 64, 1.2), **TINY),
    # The embedded default run: a small Llama that learns on 2 CPU cores in minutes.
    LlamaConfig(name="small-llama", vocab_size=2048, hidden_size=256, num_layers=4, num_heads=4,
        num_kv_heads=2, intermediate_size=768, max_seq_len=512, dtype="float32",
        tie_word_embeddings=True),
)
