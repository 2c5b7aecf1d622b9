"""The pre-norm decoder block GPT-2, the Llama family and (with a routed MLP) MoE share."""

from __future__ import annotations

from typing import Callable

from flax import linen as nn

from zoo.sharding import constrain


class DecoderBlock(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(x)). Scanned over layers.

    `make_norm`, `make_attention` and `make_mlp` build the family's pieces, so GPT-2
    and the Llama family share one block.
    """

    make_norm: Callable[[str], nn.Module]
    make_attention: Callable[[], nn.Module]
    make_mlp: Callable[[], nn.Module]

    @nn.compact
    def __call__(self, x_BTD, positions_BT, segment_ids_BT):
        x_BTD = constrain(x_BTD, ("batch", "length", "activation_embed"))
        attn = self.make_attention(name="attn")
        x_BTD = x_BTD + attn(self.make_norm(name="attn_norm")(x_BTD), positions_BT, segment_ids_BT)
        x_BTD = x_BTD + self.make_mlp(name="mlp")(self.make_norm(name="mlp_norm")(x_BTD))
        return constrain(x_BTD, ("batch", "length", "activation_embed")), None
