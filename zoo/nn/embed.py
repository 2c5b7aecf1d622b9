"""Embedding tables (token, position, type); a tied output head reads `embedding` (zoo/nn/vocab_head.py)."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from zoo.nn.linear import default_init, param_with_axes


class Embed(nn.Module):
    """Token embedding table [V, D]."""

    num_embeddings: int
    features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    axes: tuple[str, str] = ("vocab", "embed")

    def setup(self):
        self.embedding = self.param("embedding", param_with_axes(default_init, self.axes),
                                    (self.num_embeddings, self.features), self.param_dtype)

    def __call__(self, ids_BT):
        return jnp.take(self.embedding, ids_BT, axis=0).astype(self.dtype)
