"""BERT configuration and presets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from zoo.configs import TINY, ModelConfig

_BACKBONES = ("Bert", "Roberta", "XLMRoberta")
_HEADS = {"model": "Model", "mlm": "ForMaskedLM", "classify": "ForSequenceClassification"}


@dataclass(frozen=True, kw_only=True)
class BertConfig(ModelConfig):
    """BERT and RoBERTa / XLM-RoBERTa: learned absolute positions + token types,
    post-LayerNorm blocks, exact-erf GELU.

    `architecture` picks the backbone's spelling (Bert, Roberta, XLMRoberta) and the head:
    *Model (hidden states, pooler), *ForMaskedLM (tied MLM head) or
    *ForSequenceClassification (pooler + classifier; RoBERTa's classifier.dense is the
    same tanh layer on the first token). RoBERTa numbers positions from pad_token_id + 1
    and gives padding the position pad_token_id (fairseq's rule), so its position table
    has max_seq_len + pad_token_id + 1 rows (HF's max_position_embeddings: 514 for 512).
    `max_seq_len` is the longest input the model takes.
    """

    family: ClassVar[str] = "bert"
    mlp_matrices: ClassVar[int] = 2
    causal: ClassVar[bool] = False
    BACKBONES: ClassVar[tuple[str, ...]] = _BACKBONES
    HEADS: ClassVar[dict[str, str]] = _HEADS
    ARCHITECTURES: ClassVar[tuple[str, ...]] = tuple(b + h for b in _BACKBONES for h in _HEADS.values())

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
        if self.backbone != "Bert" and (self.pad_token_id is None or self.pad_token_id < 0):
            raise ValueError(f"{self.name}: {self.architecture} numbers positions from pad_token_id + 1; "
                             "it needs a pad_token_id >= 0")

    @property
    def backbone(self) -> str:
        """Bert, Roberta or XLMRoberta."""
        return next(b for b in sorted(self.BACKBONES, key=len, reverse=True) if self.architecture.startswith(b))

    @property
    def head(self) -> str:
        """model, mlm or classify."""
        return next(k for k, v in self.HEADS.items() if self.architecture == self.backbone + v)

    def with_head(self, head: str) -> str:
        """The architecture with this backbone and `head` (a key of HEADS)."""
        return self.backbone + self.HEADS[head]

    @property
    def model_token_ids(self) -> tuple[str, ...]:
        """Token-id fields the forward computes with (a tokenizer's ids must not replace them)."""
        return () if self.backbone == "Bert" else ("pad_token_id",)

    @property
    def position_offset(self) -> int:
        """Position id of the first token: 0 for BERT, pad_token_id + 1 for RoBERTa."""
        return 0 if self.backbone == "Bert" else self.pad_token_id + 1

    @property
    def hf_architecture(self) -> str:  # type: ignore[override]
        return self.architecture


_BERT = dict(vocab_size=30522, max_seq_len=512, type_vocab_size=2)
_ROBERTA = dict(vocab_size=50265, max_seq_len=512, type_vocab_size=1, layer_norm_eps=1e-5, bos_token_id=0,
                pad_token_id=1, eos_token_id=2, mask_token_id=50264)

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
    # roberta-base / -large and xlm-roberta-base / -large as their MLM checkpoints ship
    # (125M / 355M / 279M / 561M on the hub): <s>=0 <pad>=1 </s>=2, <mask> the last id.
    BertConfig(name="roberta-base", architecture="RobertaForMaskedLM", hidden_size=768, num_layers=12, num_heads=12,
        intermediate_size=3072, **_ROBERTA),
    BertConfig(name="roberta-large", architecture="RobertaForMaskedLM", hidden_size=1024, num_layers=24,
        num_heads=16, intermediate_size=4096, **_ROBERTA),
    BertConfig(name="xlm-roberta-base", architecture="XLMRobertaForMaskedLM", hidden_size=768, num_layers=12,
        num_heads=12, intermediate_size=3072, **{**_ROBERTA, "vocab_size": 250002, "mask_token_id": 250001}),
    BertConfig(name="xlm-roberta-large", architecture="XLMRobertaForMaskedLM", hidden_size=1024, num_layers=24,
        num_heads=16, intermediate_size=4096, **{**_ROBERTA, "vocab_size": 250002, "mask_token_id": 250001}),
    # The tiny ones use the ids of the tokenizer train.py builds (pad 0, unk 1 as [MASK], bos 2, eos 3).
    BertConfig(name="tiny-roberta", architecture="RobertaForMaskedLM", mask_token_id=1, type_vocab_size=1,
        bos_token_id=2, pad_token_id=0, eos_token_id=3, **TINY),
    BertConfig(name="tiny-xlm-roberta-cls", architecture="XLMRobertaForSequenceClassification", mask_token_id=1,
        type_vocab_size=1, bos_token_id=2, pad_token_id=0, eos_token_id=3, **TINY),
)
