"""T5 configuration (v1.0 and v1.1 / Flan) and presets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from zoo.configs import TINY, ModelConfig


@dataclass(frozen=True, kw_only=True)
class T5Config(ModelConfig):
    """T5, mT5 and UMT5 encoder-decoders: relative position buckets, RMS layer norm, no
    attention scaling.

    v1.0: feed_forward_proj="relu", tied head with the decoder output scaled by
    hidden_size**-0.5. v1.1 / Flan: "gated-gelu" (tanh GELU) and an untied lm_head.
    scale_decoder_outputs defaults to tie_word_embeddings (the rule of the original
    T5 code); transformers>=5 saves v1.1 models tied but unscaled, so it is separate.
    mT5 (`architecture="MT5ForConditionalGeneration"`) is v1.1 with a 250k vocabulary and
    never scales its decoder output; UMT5 gives every layer's self-attention its own
    relative-position table (T5 and mT5 share the first layer's across the stack).
    num_layers counts encoder blocks; num_decoder_layers 0 means the same number.
    `max_seq_len` only bounds training lengths (T5 has no position table).
    """

    family: ClassVar[str] = "t5"
    FEED_FORWARD: ClassVar[tuple[str, ...]] = ("relu", "gated-gelu")
    ARCHITECTURES: ClassVar[tuple[str, ...]] = ("T5ForConditionalGeneration", "MT5ForConditionalGeneration",
                                                "UMT5ForConditionalGeneration")

    architecture: str = "T5ForConditionalGeneration"
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
        if self.architecture not in self.ARCHITECTURES:
            raise ValueError(f"{self.name}: architecture {self.architecture!r} is not one of {self.ARCHITECTURES}")
        mt5 = self.architecture == "MT5ForConditionalGeneration"
        if self.scale_decoder_outputs is None:
            object.__setattr__(self, "scale_decoder_outputs", self.tie_word_embeddings and not mt5)
        if mt5 and self.scale_decoder_outputs:
            raise ValueError(f"{self.name}: MT5ForConditionalGeneration never scales the decoder output "
                             "(scale_decoder_outputs must be False)")
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
    def hf_architecture(self) -> str:  # type: ignore[override]
        return self.architecture

    @property
    def relative_bias_per_layer(self) -> bool:
        """UMT5: each layer's self-attention has its own relative-position table."""
        return self.architecture == "UMT5ForConditionalGeneration"

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


_T5 = dict(vocab_size=32128, head_dim=64, max_seq_len=512, first_sentinel_id=32099)
_V11 = dict(head_dim=64, max_seq_len=1024, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
_MT5 = dict(architecture="MT5ForConditionalGeneration", vocab_size=250112, first_sentinel_id=250099, **_V11)
_UMT5 = dict(architecture="UMT5ForConditionalGeneration", vocab_size=256384, **_V11)

PRESETS = (
    # T5 v1.0 (tied, ReLU) and Flan-T5 (v1.1: gated-GELU, untied); vocab 32128, sentinels from 32099.
    T5Config(name="t5-small", hidden_size=512, num_layers=6, num_heads=8, intermediate_size=2048, **_T5),
    T5Config(name="t5-base", hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072, **_T5),
    T5Config(name="t5-large", hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096, **_T5),
    T5Config(name="flan-t5-base", hidden_size=768, num_layers=12, num_heads=12, intermediate_size=2048,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, **_T5),
    # mT5 (250,112 ids) and UMT5 (256,384 ids): v1.1 shapes, untied, sentinels count down from the
    # last id. The hub's counts: mt5-small 300M, -base 582M, -large 1.23B, -xl 3.74B; umt5 as listed.
    T5Config(name="mt5-small", hidden_size=512, num_layers=8, num_heads=6, intermediate_size=1024, **_MT5),
    T5Config(name="mt5-base", hidden_size=768, num_layers=12, num_heads=12, intermediate_size=2048, **_MT5),
    T5Config(name="mt5-large", hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=2816, **_MT5),
    T5Config(name="mt5-xl", hidden_size=2048, num_layers=24, num_heads=32, intermediate_size=5120, **_MT5),
    T5Config(name="umt5-small", hidden_size=512, num_layers=8, num_heads=6, intermediate_size=1024, **_UMT5),
    T5Config(name="umt5-base", hidden_size=768, num_layers=12, num_heads=12, intermediate_size=2048, **_UMT5),
    T5Config(name="umt5-xl", hidden_size=2048, num_layers=24, num_heads=32, intermediate_size=5120, **_UMT5),
    T5Config(name="tiny-t5", **TINY),
    T5Config(name="tiny-t5-v1.1", feed_forward_proj="gated-gelu", tie_word_embeddings=False, **TINY),
    T5Config(name="tiny-mt5", architecture="MT5ForConditionalGeneration", feed_forward_proj="gated-gelu",
        tie_word_embeddings=False, **TINY),
    T5Config(name="tiny-umt5", architecture="UMT5ForConditionalGeneration", feed_forward_proj="gated-gelu",
        tie_word_embeddings=False, **TINY),
)
