"""BERT configuration and presets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from zoo.configs import TINY, ModelConfig


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


_BERT = dict(vocab_size=30522, max_seq_len=512, type_vocab_size=2)

PRESETS = (
    # bert-base-uncased / bert-large-uncased (BertModel with pooler: 109.48M / 335.14M).
    BertConfig(name="bert-base", hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072, **_BERT),
    BertConfig(name="bert-large", hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096,
        **_BERT),
    # Tiny encoder presets for tests and CPU runs. tiny-bert trains with --objective mlm:
    # the sentencepiece tokenizer train.py builds never emits unk (byte fallback), so
    # id 1 is free to serve as [MASK].
    BertConfig(name="tiny-bert", architecture="BertForMaskedLM", mask_token_id=1, **TINY),
    BertConfig(name="tiny-bert-cls", architecture="BertForSequenceClassification", mask_token_id=1, **TINY),
)
