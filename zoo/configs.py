"""The base of every family's frozen model config (zoo/models/<family>/config.py).

Field names follow Hugging Face's config.json where one exists, so that the
conversion tables in `zoo/models/<family>/hf.py` stay short. Every config checks itself in
`__post_init__` so that an impossible model fails before anything compiles.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import ClassVar

from kernels.api import CONTEXT_PARALLEL

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
    # How attention runs when the mesh's context axis splits the length (kernels.attention's
    # context_parallel, CONTEXT_PARALLEL): "allgather" gathers k and v, "ring" passes k/v blocks around.
    context_parallel: str = "allgather"
    # The training loss's cross-entropy runs over blocks of this many vocabulary columns and never
    # holds the [B, T, V] logits (zoo/nn/chunked_ce.py); 0: on the whole logits.
    loss_vocab_block: int = 4096
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
        if self.loss_vocab_block < 0:
            raise ValueError(f"{self.name}: loss_vocab_block must be >= 0 (0: the whole logits), "
                             f"got {self.loss_vocab_block}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"{self.name}: remat={self.remat!r} is not one of {REMAT_POLICIES}")
        if self.context_parallel not in CONTEXT_PARALLEL:
            raise ValueError(f"{self.name}: context_parallel={self.context_parallel!r} is not one of "
                             f"{CONTEXT_PARALLEL}")

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


# Sizes of the tiny presets every family has (tests and CPU runs).
TINY = dict(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, max_seq_len=256,
            dtype="float32")


def parse_overrides(items) -> dict[str, str]:
    """--override's FIELD=VALUE items as {field: text}; ValueError for an item without '='."""
    out = {}
    for item in items or ():
        key, eq, value = str(item).partition("=")
        if not eq or not key.strip():
            raise ValueError(f"--override {item!r}: expected FIELD=VALUE")
        out[key.strip()] = value
    return out


def _tuples(value):
    """JSON lists as tuples, nested too (configs are hashable)."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _typed(current, text: str, key: str):
    """--override's text as the type of the field's current value; "null" is None for any field;
    JSON (lists as tuples) for fields that hold None or a tuple."""
    if text == "null":
        return None
    what = type(current).__name__
    if current is None and text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        if isinstance(current, bool):
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return text.lower() in ("true", "1")
        if isinstance(current, (int, float)):
            return type(current)(int(text) if isinstance(current, int) else float(text))
        if isinstance(current, str):
            return text
    except ValueError:
        raise ValueError(f"--override {key}={text}: expected a value of type {what}") from None
    try:
        return _tuples(json.loads(text))
    except json.JSONDecodeError:
        return text


# Fields __post_init__ fills from others when 0 (num_kv_heads from num_heads, head_dim from the sizes)
DERIVED_FIELDS = ("num_kv_heads", "head_dim")


def with_overrides(cfg: ModelConfig, overrides: dict) -> ModelConfig:
    """`cfg` with field overrides (train.py's --override, --dtype, --remat...). Text values take the
    type of the field's current value (`_typed`). A derived field (DERIVED_FIELDS) that `cfg` had
    derived is derived again from the new values unless it is overridden itself. ValueError, one
    line, for an unknown field, a bad value or a failed config check."""
    if not overrides:
        return cfg
    fields = {f.name for f in dataclasses.fields(cfg)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"--override {unknown[0]}: the {cfg.family} config {cfg.name!r} has no field {unknown[0]!r}")
    typed = {k: _typed(getattr(cfg, k), v, k) if isinstance(v, str) else v for k, v in overrides.items()}
    for name in DERIVED_FIELDS:
        if name in typed or not hasattr(cfg, name):
            continue
        try:
            derived = getattr(cfg.replace(**{name: 0}), name)
        except ValueError:
            continue
        if derived == getattr(cfg, name):  # cfg derived it: derive it again after the overrides
            typed[name] = 0
    try:
        return cfg.replace(**typed)
    except TypeError as e:
        raise ValueError(str(e)) from None
