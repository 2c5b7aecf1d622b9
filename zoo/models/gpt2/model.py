"""GPT-2 (and GPT-3-shaped dense models): learned positions, pre-LayerNorm blocks,
GELU MLP, biases everywhere, LM head tied to the token embedding."""

from __future__ import annotations

from functools import partial

import jax.numpy as jnp
from flax import linen as nn

from zoo.models.gpt2.config import GPT2Config
from zoo.nn.attention import SelfAttention
from zoo.nn.blocks import DecoderBlock
from zoo.nn.embed import Embed
from zoo.nn.masks import default_positions, mask_to_segment_ids
from zoo.nn.mlp import MLP
from zoo.nn.norms import LayerNorm
from zoo.nn.scan import scan_layers
from zoo.nn.vocab_head import VocabHead
from zoo.sharding import constrain


class GPT2(nn.Module):
    """GPT2LMHeadModel: `apply(params, input_ids, attention_mask=None, *, positions, segment_ids)` -> logits."""

    cfg: GPT2Config
    decode: bool = False  # KV-cache mode for zoo.generate (see zoo/nn/attention.py)

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, *, positions=None, segment_ids=None, return_hidden=False,
                 return_head=False):
        cfg = self.cfg
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        positions_BT = default_positions(input_ids) if positions is None else positions
        segment_ids_BT = mask_to_segment_ids(attention_mask, segment_ids)

        wte = Embed(cfg.vocab_size, cfg.hidden_size, name="wte", **kw)
        wpe = Embed(cfg.max_seq_len, cfg.hidden_size, axes=("positions", "embed"), name="wpe", **kw)
        x_BTD = wte(input_ids) + wpe(positions_BT)
        x_BTD = constrain(x_BTD, ("batch", "length", "activation_embed"))

        blocks = scan_layers(
            DecoderBlock, cfg.num_layers, cfg.remat,
            make_norm=partial(LayerNorm, cfg.layer_norm_epsilon, **kw),
            make_attention=partial(SelfAttention, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                                   qkv_bias=True, out_bias=True, attention_impl=cfg.attention_impl,
                                   context_parallel=cfg.context_parallel, decode=self.decode, **kw),
            make_mlp=partial(MLP, cfg.hidden_size, cfg.intermediate_size, "gelu_tanh", gated=False, use_bias=True,
                             **kw),
        )
        x_BTD, _ = blocks(x_BTD, positions_BT, segment_ids_BT)
        x_BTD = LayerNorm(cfg.layer_norm_epsilon, name="ln_f", **kw)(x_BTD)
        if return_hidden:
            return x_BTD
        head = VocabHead(wte.embedding, dtype=kw["dtype"])
        return (x_BTD, head) if return_head else head.logits(x_BTD)
