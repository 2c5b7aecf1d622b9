"""ModernBERT configuration and presets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from zoo.configs import TINY, ModelConfig

_HEADS = {"model": "ModernBertModel", "mlm": "ModernBertForMaskedLM",
          "classify": "ModernBertForSequenceClassification"}


@dataclass(frozen=True, kw_only=True)
class ModernBertConfig(ModelConfig):
    """ModernBERT (Warner et al. 2024): a pre-norm encoder with RoPE, GeGLU, LayerNorms and
    linear layers without biases, and layers alternating global attention with local
    attention over a window of `local_attention` tokens (half each way); every
    `global_attn_every_n_layers`-th layer (the first included) is global, with its own RoPE
    base. The first layer has no norm before its attention. `max_seq_len` bounds training
    lengths (no position table).

    `architecture` picks the head: ModernBertModel (hidden states), ModernBertForMaskedLM
    (dense, GELU, norm, tied decoder with a bias) or ModernBertForSequenceClassification
    (the same head on the first token, or the mean over real tokens, then a classifier).
    """

    family: ClassVar[str] = "modernbert"
    causal: ClassVar[bool] = False
    HEADS: ClassVar[dict[str, str]] = _HEADS
    ARCHITECTURES: ClassVar[tuple[str, ...]] = tuple(_HEADS.values())
    POOLINGS: ClassVar[tuple[str, ...]] = ("cls", "mean")

    architecture: str = "ModernBertForMaskedLM"
    local_attention: int = 128  # tokens in a local window, self included: half of it each way
    global_attn_every_n_layers: int = 3
    global_rope_theta: float = 160000.0
    local_rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    classifier_pooling: str = "cls"
    num_labels: int = 2
    # The tokenizer's [MASK] (50284 in ModernBERT's vocabulary); not part of HF's config.json.
    mask_token_id: int = 50284

    def __post_init__(self):
        super().__post_init__()
        if self.architecture not in self.ARCHITECTURES:
            raise ValueError(f"{self.name}: architecture {self.architecture!r} is not one of {self.ARCHITECTURES}")
        if self.num_kv_heads != self.num_heads:
            raise ValueError(f"{self.name}: ModernBERT has no grouped-query attention")
        if self.head_dim % 2:
            raise ValueError(f"{self.name}: RoPE needs an even head_dim, got {self.head_dim}")
        if self.local_attention < 2 or self.global_attn_every_n_layers < 1:
            raise ValueError(f"{self.name}: local_attention must be >= 2 and global_attn_every_n_layers >= 1")
        if self.classifier_pooling not in self.POOLINGS:
            raise ValueError(f"{self.name}: classifier_pooling must be one of {self.POOLINGS}")
        if self.num_labels <= 0 or not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(f"{self.name}: num_labels must be positive and mask_token_id inside the vocabulary")

    @property
    def hf_architecture(self) -> str:  # type: ignore[override]
        return self.architecture

    @property
    def head(self) -> str:
        """model, mlm or classify."""
        return next(k for k, v in self.HEADS.items() if v == self.architecture)

    def with_head(self, head: str) -> str:
        return self.HEADS[head]

    def is_global(self, layer: int) -> bool:
        return layer % self.global_attn_every_n_layers == 0

    def attention_kinds(self) -> tuple[tuple, tuple[int, ...]]:
        """(the distinct (window per side, rope_theta, None, None) kinds, each layer's index): global layers
        see everything, local ones local_attention // 2 tokens each way."""
        kinds = ((None, self.global_rope_theta, None, None),
                 (self.local_attention // 2, self.local_rope_theta, None, None))
        return kinds, tuple(0 if self.is_global(i) else 1 for i in range(self.num_layers))


_MODERNBERT = dict(vocab_size=50368, max_seq_len=8192, bos_token_id=50281, eos_token_id=50282, pad_token_id=50283)

PRESETS = (
    # answerdotai/ModernBERT-base and -large (the hub's counts: 149.0M and 394.8M)
    ModernBertConfig(name="modernbert-base", hidden_size=768, num_layers=22, num_heads=12, intermediate_size=1152,
        **_MODERNBERT),
    ModernBertConfig(name="modernbert-large", hidden_size=1024, num_layers=28, num_heads=16,
        intermediate_size=2624, **_MODERNBERT),
    # Tiny ones with the ids of the tokenizer train.py builds (pad 0, unk 1 as [MASK], bos 2, eos 3);
    # 4 layers: global, local, local, global.
    ModernBertConfig(name="tiny-modernbert", local_attention=16, mask_token_id=1, bos_token_id=2, eos_token_id=3,
        pad_token_id=0, **{**TINY, "num_layers": 4}),
    ModernBertConfig(name="tiny-modernbert-cls", architecture="ModernBertForSequenceClassification",
        local_attention=16, mask_token_id=1, bos_token_id=2, eos_token_id=3, pad_token_id=0,
        **{**TINY, "num_layers": 4}),
)
