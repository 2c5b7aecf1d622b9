"""The output projection onto the vocabulary, described instead of applied.

A model's head is `logits = softcap(float32(h @ W (+ bias)))`. `VocabHead` carries W, the bias and
how to apply them, so the training loss can compute the cross-entropy over vocabulary blocks
(zoo/nn/chunked_ce.py) without ever holding the [B, T, V] logits, while generation and evaluation
call `VocabHead.logits`: one definition of the head for both paths.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import struct

from zoo.nn.linear import default_init, param_with_axes
from zoo.sharding import constrain


@struct.dataclass
class VocabHead:
    """weight [V, D] (layout "VD": a tied embedding table) or [D, V] ("DV": an lm_head kernel);
    bias [V] or None; softcap c gives c * tanh(z / c) on the float32 logits; dtype is the
    compute dtype of the matmul and the bias add. A pytree: weight and bias are its leaves."""

    weight: jax.Array
    bias: jax.Array | None = None
    layout: str = struct.field(pytree_node=False, default="VD")
    softcap: float | None = struct.field(pytree_node=False, default=None)
    dtype: Any = struct.field(pytree_node=False, default=jnp.float32)

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0 if self.layout == "VD" else 1]

    def logits(self, h_BTD) -> jax.Array:
        """[B, T, V] in logit_dtype, constrained to the activation sharding."""
        eq = "BTD,VD->BTV" if self.layout == "VD" else "BTD,DV->BTV"
        raw_BTV = jnp.einsum(eq, h_BTD.astype(self.dtype), self.weight.astype(self.dtype))
        if self.bias is not None:
            raw_BTV = raw_BTV + self.bias.astype(self.dtype)
        return constrain(self.cap(raw_BTV.astype(self.logit_dtype)), ("batch", "length", "activation_vocab"))

    @property
    def logit_dtype(self):
        """float32 (float64 where the head computes in float64: the tests' exact reference)."""
        return jnp.promote_types(self.dtype, jnp.float32)

    def cap(self, z):
        """The soft cap on float32 logits (identity without one)."""
        return z if self.softcap is None else self.softcap * jnp.tanh(z / self.softcap)


class VocabProjection(nn.Module):
    """An untied head's parameter, `kernel` [D, V] with axes ("embed", "vocab"): the same path,
    shape, axes and initializer as a `Dense((V,), ("embed",), ("vocab",), name="lm_head")`."""

    features: int
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, in_features: int) -> jax.Array:
        return self.param("kernel", param_with_axes(default_init, ("embed", "vocab")),
                          (in_features, self.features), self.param_dtype)


def lm_head(cfg, embed, dtype, param_dtype, softcap: float | None = None) -> VocabHead:
    """A decoder's head, built inside its compact `__call__`: tied to `embed` (an Embed) when
    cfg.tie_word_embeddings, else a VocabProjection named "lm_head"."""
    if cfg.tie_word_embeddings:
        return VocabHead(embed.embedding, None, "VD", softcap, jnp.dtype(dtype))
    kernel = VocabProjection(cfg.vocab_size, jnp.dtype(param_dtype), name="lm_head")(cfg.hidden_size)
    return VocabHead(kernel, None, "DV", softcap, jnp.dtype(dtype))
