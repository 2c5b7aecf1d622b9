"""Feed-forward blocks: gated (SwiGLU/GeGLU) or plain, and the activations by config name."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from zoo.nn.linear import Dense
from zoo.sharding import constrain

ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
}


class MLP(nn.Module):
    """Feed-forward: gated (SwiGLU/GeGLU: gate_proj, up_proj, down_proj) or plain (fc_in, fc_out)."""

    hidden_size: int
    intermediate_size: int
    activation: str
    gated: bool
    use_bias: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BTD):
        dense = lambda feats, i, o, name: Dense((feats,), i, o, use_bias=self.use_bias, dtype=self.dtype,
                                                param_dtype=self.param_dtype, name=name)
        act = ACTIVATIONS[self.activation]
        if self.gated:
            h_BTF = act(dense(self.intermediate_size, ("embed",), ("mlp",), "gate_proj")(x_BTD))
            h_BTF = h_BTF * dense(self.intermediate_size, ("embed",), ("mlp",), "up_proj")(x_BTD)
        else:
            h_BTF = act(dense(self.intermediate_size, ("embed",), ("mlp",), "fc_in")(x_BTD))
        h_BTF = constrain(h_BTF, ("batch", "length", "activation_mlp"))
        out_name = "down_proj" if self.gated else "fc_out"
        return dense(self.hidden_size, ("mlp",), ("embed",), out_name)(h_BTF)
