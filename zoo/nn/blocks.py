"""The decoder block GPT-2, the Llama family (Gemma 2/3 and OLMo 2 norm placements included)
and (with a routed MLP) MoE share."""

from __future__ import annotations

from typing import Callable

from flax import linen as nn

from zoo.sharding import constrain

# Where a block's norms sit around each sublayer f (attention, then the MLP):
#   "pre":      x + f(norm(x))                 (GPT-2, Llama, ...)
#   "sandwich": x + post_norm(f(norm(x)))      (Gemma 2/3)
#   "post":     x + post_norm(f(x))            (OLMo 2)
NORM_PLACEMENTS = ("pre", "sandwich", "post")


class DecoderBlock(nn.Module):
    """x + attn(...), then + mlp(...), with norms placed per `norm_placement`. Scanned over layers.

    `make_norm`, `make_attention` and `make_mlp` build the family's pieces, so GPT-2
    and the Llama family share one block. Norm names: `attn_norm`/`mlp_norm` before a
    sublayer, `attn_post_norm`/`mlp_post_norm` after it. `layer` (the scanned layer index)
    goes to the attention, whose layers may differ in kind.
    """

    make_norm: Callable[[str], nn.Module]
    make_attention: Callable[[], nn.Module]
    make_mlp: Callable[[], nn.Module]
    norm_placement: str = "pre"

    def sublayer(self, x_BTD, f, name: str):
        """x + f(x) with this block's norms around f (call from a compact method)."""
        h_BTD = self.make_norm(name=f"{name}_norm")(x_BTD) if self.norm_placement != "post" else x_BTD
        h_BTD, extra = f(h_BTD)
        if self.norm_placement != "pre":
            h_BTD = self.make_norm(name=f"{name}_post_norm")(h_BTD)
        return x_BTD + h_BTD, extra

    def attention(self, x_BTD, positions_BT, segment_ids_BT, layer):
        attn = self.make_attention(name="attn")
        args = (positions_BT, segment_ids_BT) if layer is None else (positions_BT, segment_ids_BT, layer)
        return self.sublayer(x_BTD, lambda h: (attn(h, *args), None), "attn")[0]

    @nn.compact
    def __call__(self, x_BTD, positions_BT, segment_ids_BT, layer=None):
        x_BTD = constrain(x_BTD, ("batch", "length", "activation_embed"))
        x_BTD = self.attention(x_BTD, positions_BT, segment_ids_BT, layer)
        mlp = self.make_mlp(name="mlp")
        x_BTD, _ = self.sublayer(x_BTD, lambda h: (mlp(h), None), "mlp")
        return constrain(x_BTD, ("batch", "length", "activation_embed")), None
