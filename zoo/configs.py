"""Frozen model configs and named presets.

Field names follow Hugging Face's config.json where one exists, so that the
conversion tables in `zoo/models/<family>/hf.py` stay short. Every config checks itself in
`__post_init__` so that an impossible model fails before anything compiles.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

# Per-layer activation checkpointing choices (zoo/nn/scan.py maps each to a jax checkpoint policy).
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "save_attention_out")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Fields every family shares. Sizes follow the letter legend of STYLE.md."""

    family: ClassVar[str] = ""
    hf_architecture: ClassVar[str] = ""

    name: str = "custom"
    vocab_size: int
    hidden_size: int  # D
    num_layers: int
    num_heads: int  # N
    num_kv_heads: int = 0  # K; 0 means num_heads (multi-head attention)
    head_dim: int = 0  # H; 0 means hidden_size // num_heads
    intermediate_size: int  # F
    max_seq_len: int = 2048
    dtype: str = "bfloat16"  # compute dtype
    param_dtype: str = "float32"  # master weights
    remat: str = "none"  # activation checkpointing policy per layer
    attention_impl: str | None = None  # kernels.attention implementation; None picks per backend
    # Special token ids as HF's config.json has them (None: the checkpoint has none). They travel
    # HF -> zoo -> HF; a zoo run's export takes them from its tokenizer (zoo/hf/convert.py `to_hf`).
    # eos may be several ids (Llama 3 instruct); they are kept as a tuple (configs are hashed).
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        if isinstance(self.eos_token_id, list):  # JSON gives lists back
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        # Sizes first: the defaults below divide by num_heads.
        for field in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size", "max_seq_len"):
            if getattr(self, field) <= 0:
                raise ValueError(f"{self.name}: {field} must be positive, got {getattr(self, field)}")
        for field in ("num_kv_heads", "head_dim"):
            if getattr(self, field) < 0:
                raise ValueError(f"{self.name}: {field} must be positive (or 0 for the default), "
                                 f"got {getattr(self, field)}")
        if not self.num_kv_heads:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        if not self.head_dim:
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"{self.name}: hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; "
                    "set head_dim explicitly"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"{self.name}: num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.dtype not in DTYPES or self.param_dtype not in DTYPES:
            raise ValueError(f"{self.name}: dtype and param_dtype must be one of {DTYPES}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"{self.name}: remat={self.remat!r} is not one of {REMAT_POLICIES}")

    def replace(self, **changes) -> "ModelConfig":
        """A copy with some fields changed (re-validated)."""
        return dataclasses.replace(self, **changes)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 * (non-embedding matmul params + lm head) + attention.

        Attention adds 12 * layers * heads * head_dim * keys, with keys the mean number of
        keys a query attends to (QK^T and PV, forward and backward; PaLM, appendix B):
        seq_len for bidirectional attention, seq_len / 2 for causal attention (the
        convention of MaxText and FlashAttention, so MFU figures compare), less under a
        sliding window.
        """
        d, n, k, h = self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim
        attn_proj = d * h * (2 * n + 2 * k)
        mlp = self.mlp_matrices * d * self.intermediate_size
        dense = self.num_layers * (attn_proj + mlp) + d * self.vocab_size
        return 6.0 * dense + 12.0 * self.num_layers * n * h * self.attended_keys(seq_len)

    def attended_keys(self, seq_len: int) -> float:
        """Mean keys per query: seq_len / 2 when causal; with a window W < seq_len, the mean of
        min(position, W) over positions, W - W^2 / (2 seq_len); seq_len when bidirectional."""
        if not self.causal:
            return float(seq_len)
        window = getattr(self, "sliding_window", None)
        if window is not None and window < seq_len:
            return window - window * window / (2.0 * seq_len)
        return seq_len / 2.0

    mlp_matrices: ClassVar[int] = 3
    causal: ClassVar[bool] = True  # decoders; encoders (BERT) attend both ways


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


PRESETS: dict[str, ModelConfig] = {}


def _register(cfg: ModelConfig) -> None:
    PRESETS[cfg.name] = cfg


# --- GPT-2 (OpenAI sizes; vocab 50257, context 1024) -------------------------------
for _name, _d, _l, _n in (
    ("gpt2-124m", 768, 12, 12),
    ("gpt2-350m", 1024, 24, 16),
    ("gpt2-774m", 1280, 36, 20),
    ("gpt2-1.5b", 1600, 48, 25),
):
    _register(GPT2Config(name=_name, vocab_size=50257, hidden_size=_d, num_layers=_l, num_heads=_n,
                         intermediate_size=4 * _d, max_seq_len=1024))
# GPT-3 175B: the GPT-2 architecture at GPT-3 scale (dense attention everywhere).
_register(GPT2Config(name="gpt3-175b", vocab_size=50257, hidden_size=12288, num_layers=96, num_heads=96,
                     intermediate_size=4 * 12288, max_seq_len=2048))

# --- Llama 3 ---------------------------------------------------------------------
_LLAMA3 = dict(vocab_size=128256, rope_theta=500000.0, rms_norm_eps=1e-5, max_seq_len=131072)
_register(LlamaConfig(name="llama3.2-1b", hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8,
                      intermediate_size=8192, tie_word_embeddings=True, rope_scaling=(32.0, 1.0, 4.0, 8192),
                      **_LLAMA3))
_register(LlamaConfig(name="llama3.2-3b", hidden_size=3072, num_layers=28, num_heads=24, num_kv_heads=8,
                      intermediate_size=8192, tie_word_embeddings=True, rope_scaling=(32.0, 1.0, 4.0, 8192),
                      **_LLAMA3))
_register(LlamaConfig(name="llama3.1-8b", hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                      intermediate_size=14336, rope_scaling=(8.0, 1.0, 4.0, 8192), **_LLAMA3))
_register(LlamaConfig(name="llama3.1-70b", hidden_size=8192, num_layers=80, num_heads=64, num_kv_heads=8,
                      intermediate_size=28672, rope_scaling=(8.0, 1.0, 4.0, 8192), **_LLAMA3))
_register(LlamaConfig(name="mistral-7b", architecture="MistralForCausalLM", vocab_size=32000, hidden_size=4096,
                      num_layers=32, num_heads=32, num_kv_heads=8, intermediate_size=14336, sliding_window=4096,
                      max_seq_len=32768, rms_norm_eps=1e-5))
_register(LlamaConfig(name="qwen3-0.6b", architecture="Qwen3ForCausalLM", vocab_size=151936, hidden_size=1024,
                      num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128, intermediate_size=3072,
                      qk_norm=True, tie_word_embeddings=True, rope_theta=1000000.0, rms_norm_eps=1e-6,
                      max_seq_len=40960))
_register(LlamaConfig(name="qwen3-8b", architecture="Qwen3ForCausalLM", vocab_size=151936, hidden_size=4096,
                      num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128, intermediate_size=12288,
                      qk_norm=True, rope_theta=1000000.0, rms_norm_eps=1e-6, max_seq_len=40960))
_register(LlamaConfig(name="gemma-2b", architecture="GemmaForCausalLM", vocab_size=256000, hidden_size=2048,
                      num_layers=18, num_heads=8, num_kv_heads=1, head_dim=256, intermediate_size=16384,
                      hidden_act="gelu_tanh", norm_offset=True, embed_scale=True, tie_word_embeddings=True,
                      rms_norm_eps=1e-6, max_seq_len=8192))

# --- tiny presets: one per family switch, for tests and CPU runs ---------------------
_TINY = dict(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, max_seq_len=256,
             dtype="float32")
_register(GPT2Config(name="tiny-gpt2", **_TINY))
_register(LlamaConfig(name="tiny-llama", num_kv_heads=2, rope_scaling=(8.0, 1.0, 4.0, 64), **_TINY))
_register(LlamaConfig(name="tiny-mistral", architecture="MistralForCausalLM", num_kv_heads=2, sliding_window=16,
                      **_TINY))
_register(LlamaConfig(name="tiny-qwen2", architecture="Qwen2ForCausalLM", num_kv_heads=2, attention_bias=True,
                      tie_word_embeddings=True, rms_norm_eps=1e-6, **_TINY))
_register(LlamaConfig(name="tiny-qwen3", architecture="Qwen3ForCausalLM", num_kv_heads=2, head_dim=32,
                      qk_norm=True, tie_word_embeddings=True, rms_norm_eps=1e-6, **_TINY))
_register(LlamaConfig(name="tiny-gemma", architecture="GemmaForCausalLM", num_kv_heads=1, head_dim=32,
                      hidden_act="gelu_tanh", norm_offset=True, embed_scale=True, tie_word_embeddings=True,
                      rms_norm_eps=1e-6, **_TINY))
# The embedded default run: a small Llama that learns on 2 CPU cores in minutes.
_register(LlamaConfig(name="small-llama", vocab_size=2048, hidden_size=256, num_layers=4, num_heads=4,
                      num_kv_heads=2, intermediate_size=768, max_seq_len=512, dtype="float32",
                      tie_word_embeddings=True))


# --- Encoders (BERT) and encoder-decoders (T5) -----------------------------------------


@dataclass(frozen=True, kw_only=True)
class BertConfig(ModelConfig):
    """BERT: learned absolute positions + token types, post-LayerNorm blocks, exact-erf GELU.

    `architecture` picks the head: BertModel (hidden states, pooler), BertForMaskedLM
    (tied MLM head) or BertForSequenceClassification (pooler + classifier).
    `max_seq_len` is HF's max_position_embeddings.
    """

    family: ClassVar[str] = "bert"
    mlp_matrices: ClassVar[int] = 2
    causal: ClassVar[bool] = False
    ARCHITECTURES: ClassVar[tuple[str, ...]] = ("BertModel", "BertForMaskedLM", "BertForSequenceClassification")

    architecture: str = "BertModel"
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    num_labels: int = 2
    pad_token_id: int | None = 0
    # Not part of HF's BertConfig (it lives in the tokenizer): the id the MLM objective
    # writes over masked tokens. 103 is [MASK] in the uncased BERT vocabulary.
    mask_token_id: int = 103

    def __post_init__(self):
        super().__post_init__()
        if self.architecture not in self.ARCHITECTURES:
            raise ValueError(f"{self.name}: architecture {self.architecture!r} is not one of {self.ARCHITECTURES}")
        if self.num_kv_heads != self.num_heads:
            raise ValueError(f"{self.name}: BERT has no grouped-query attention (num_kv_heads must equal num_heads)")
        if self.type_vocab_size <= 0 or self.num_labels <= 0:
            raise ValueError(f"{self.name}: type_vocab_size and num_labels must be positive")
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(f"{self.name}: mask_token_id={self.mask_token_id} is outside the vocabulary")

    @property
    def hf_architecture(self) -> str:  # type: ignore[override]
        return self.architecture


@dataclass(frozen=True, kw_only=True)
class T5Config(ModelConfig):
    """T5 encoder-decoder: relative position buckets, RMS layer norm, no attention scaling.

    v1.0: feed_forward_proj="relu", tied head with the decoder output scaled by
    hidden_size**-0.5. v1.1 / Flan: "gated-gelu" (tanh GELU) and an untied lm_head.
    scale_decoder_outputs defaults to tie_word_embeddings (the rule of the original
    T5 code); transformers>=5 saves v1.1 models tied but unscaled, so it is separate.
    num_layers counts encoder blocks; num_decoder_layers 0 means the same number.
    `max_seq_len` only bounds training lengths (T5 has no position table).
    """

    family: ClassVar[str] = "t5"
    hf_architecture: ClassVar[str] = "T5ForConditionalGeneration"
    FEED_FORWARD: ClassVar[tuple[str, ...]] = ("relu", "gated-gelu")

    num_decoder_layers: int = 0
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"
    tie_word_embeddings: bool = True
    scale_decoder_outputs: bool | None = None
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0
    # Span corruption writes sentinels counting down from this id (<extra_id_0>);
    # 0 means vocab_size - 1. T5's SentencePiece vocabulary puts it at 32099.
    first_sentinel_id: int = 0

    def __post_init__(self):
        super().__post_init__()
        if not self.num_decoder_layers:
            object.__setattr__(self, "num_decoder_layers", self.num_layers)
        if not self.first_sentinel_id:
            object.__setattr__(self, "first_sentinel_id", self.vocab_size - 1)
        if self.scale_decoder_outputs is None:
            object.__setattr__(self, "scale_decoder_outputs", self.tie_word_embeddings)
        if self.feed_forward_proj not in self.FEED_FORWARD:
            raise ValueError(f"{self.name}: feed_forward_proj must be one of {self.FEED_FORWARD}, "
                             f"got {self.feed_forward_proj!r}")
        if self.num_kv_heads != self.num_heads:
            raise ValueError(f"{self.name}: T5 has no grouped-query attention (num_kv_heads must equal num_heads)")
        if self.relative_attention_num_buckets < 4 or self.relative_attention_max_distance <= 0:
            raise ValueError(f"{self.name}: relative_attention_num_buckets must be >= 4 and max_distance positive")
        if not 0 < self.first_sentinel_id < self.vocab_size:
            raise ValueError(f"{self.name}: first_sentinel_id={self.first_sentinel_id} is outside the vocabulary")

    @property
    def mlp_matrices(self) -> int:  # type: ignore[override]
        return 3 if self.feed_forward_proj == "gated-gelu" else 2

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per (encoder + decoder) token pair, the decoders' convention per stack."""
        d, n, h, f = self.hidden_size, self.num_heads, self.head_dim, self.intermediate_size
        attn, mlp = 4 * d * n * h, self.mlp_matrices * d * f
        dense = self.num_layers * (attn + mlp) + self.num_decoder_layers * (2 * attn + mlp) + d * self.vocab_size
        # Encoder self-attention and decoder cross-attention see every key; decoder
        # self-attention is causal (half), as in the decoders' count.
        keys = self.num_layers * seq_len + self.num_decoder_layers * (seq_len + seq_len / 2.0)
        return 6.0 * dense + 12.0 * n * h * keys


# bert-base-uncased / bert-large-uncased (BertModel with pooler: 109.48M / 335.14M).
_BERT = dict(vocab_size=30522, max_seq_len=512, type_vocab_size=2)
_register(BertConfig(name="bert-base", hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072, **_BERT))
_register(BertConfig(name="bert-large", hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096,
                     **_BERT))
# T5 v1.0 (tied, ReLU) and Flan-T5 (v1.1: gated-GELU, untied); vocab 32128, sentinels from 32099.
_T5 = dict(vocab_size=32128, head_dim=64, max_seq_len=512, first_sentinel_id=32099)
_register(T5Config(name="t5-small", hidden_size=512, num_layers=6, num_heads=8, intermediate_size=2048, **_T5))
_register(T5Config(name="t5-base", hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072, **_T5))
_register(T5Config(name="t5-large", hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096, **_T5))
_register(T5Config(name="flan-t5-base", hidden_size=768, num_layers=12, num_heads=12, intermediate_size=2048,
                   feed_forward_proj="gated-gelu", tie_word_embeddings=False, **_T5))
# Tiny encoder presets for tests and CPU runs. tiny-bert trains with --objective mlm:
# the sentencepiece tokenizer train.py builds never emits unk (byte fallback), so
# id 1 is free to serve as [MASK].
_register(BertConfig(name="tiny-bert", architecture="BertForMaskedLM", mask_token_id=1, **_TINY))
_register(BertConfig(name="tiny-bert-cls", architecture="BertForSequenceClassification", mask_token_id=1, **_TINY))
_register(T5Config(name="tiny-t5", **_TINY))
_register(T5Config(name="tiny-t5-v1.1", feed_forward_proj="gated-gelu", tie_word_embeddings=False, **_TINY))


# --- Mixture-of-experts decoders (Mixtral, Qwen3-MoE) -------------------------------------


@dataclass(frozen=True, kw_only=True)
class MoEConfig(LlamaConfig):
    """The Llama decoder with every MLP a set of routed SwiGLU experts (zoo/models/moe/model.py).

    Router: softmax over all experts, the top `num_experts_per_tok` kept; Mixtral always
    renormalises the kept probabilities to sum to 1, Qwen3-MoE does when `norm_topk_prob`.
    `intermediate_size` is one expert's F (HF's `moe_intermediate_size` for Qwen3-MoE).
    Training adds `router_aux_loss_coef` * load-balancing loss (HF's formula) and
    `router_z_loss_coef` * router z-loss (ST-MoE) to the objective.
    """

    family: ClassVar[str] = "moe"
    ARCHITECTURES: ClassVar[tuple[str, ...]] = ("MixtralForCausalLM", "Qwen3MoeForCausalLM")

    architecture: str = "MixtralForCausalLM"
    num_experts: int = 8  # E
    num_experts_per_tok: int = 2  # k
    norm_topk_prob: bool = True
    router_aux_loss_coef: float = 0.001  # HF's default
    router_z_loss_coef: float = 0.001  # ST-MoE's value; not part of HF configs

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"{self.name}: num_experts_per_tok={self.num_experts_per_tok} must be in "
                             f"1..num_experts={self.num_experts}")
        if self.router_aux_loss_coef < 0 or self.router_z_loss_coef < 0:
            raise ValueError(f"{self.name}: router loss coefficients must be non-negative")

    @property
    def aux_loss_weights(self) -> dict[str, float]:
        """Weight of each auxiliary loss the model sows (read by zoo/objectives.py)."""
        return {"load_balancing_loss": self.router_aux_loss_coef, "router_z_loss": self.router_z_loss_coef}

    def flops_per_token(self, seq_len: int) -> float:
        """As the dense decoder, with k active experts per token and the router."""
        d, f, e, k = self.hidden_size, self.intermediate_size, self.num_experts, self.num_experts_per_tok
        extra = self.num_layers * ((k - 1) * self.mlp_matrices * d * f + d * e)
        return super().flops_per_token(seq_len) + 6.0 * extra


_register(MoEConfig(name="mixtral-8x7b", vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32,
                    num_kv_heads=8, intermediate_size=14336, num_experts=8, num_experts_per_tok=2,
                    rope_theta=1000000.0, rms_norm_eps=1e-5, max_seq_len=32768, router_aux_loss_coef=0.02))
_register(MoEConfig(name="qwen3-30b-a3b", architecture="Qwen3MoeForCausalLM", vocab_size=151936, hidden_size=2048,
                    num_layers=48, num_heads=32, num_kv_heads=4, head_dim=128, intermediate_size=768,
                    num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, qk_norm=True,
                    rope_theta=1000000.0, rms_norm_eps=1e-6, max_seq_len=40960))
_register(MoEConfig(name="tiny-mixtral", num_kv_heads=2, num_experts=4, num_experts_per_tok=2, **_TINY))
# Qwen3-MoE's HF default leaves the kept probabilities unnormalised: the tiny preset exercises that switch.
_register(MoEConfig(name="tiny-qwen3-moe", architecture="Qwen3MoeForCausalLM", num_kv_heads=2, head_dim=32,
                    qk_norm=True, rms_norm_eps=1e-6, num_experts=4, num_experts_per_tok=2, norm_topk_prob=False,
                    **{**_TINY, "intermediate_size": 64}))
