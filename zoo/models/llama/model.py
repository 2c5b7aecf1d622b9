"""The Llama-style decoder family: Llama 2/3 (RoPE with Llama-3 scaling, RMSNorm,
SwiGLU, GQA), Mistral (sliding window), Qwen2 (q/k/v bias), Qwen3 (q/k norm) and
Gemma (GeGLU, (1 + w) norms, sqrt(D)-scaled embeddings), chosen by config switches."""

from __future__ import annotations

import math
from functools import partial
from typing import Callable, ClassVar

import jax.numpy as jnp
from flax import linen as nn

from zoo.models.llama.config import LlamaConfig
from zoo.nn.attention import SelfAttention
from zoo.nn.blocks import DecoderBlock
from zoo.nn.embed import Embed
from zoo.nn.masks import default_positions, mask_to_segment_ids
from zoo.nn.mlp import MLP
from zoo.nn.norms import RMSNorm
from zoo.nn.scan import scan_layers
from zoo.nn.vocab_head import lm_head
from zoo.sharding import constrain


class Llama(nn.Module):
    """*ForCausalLM: `apply(params, input_ids, attention_mask=None, *, positions, segment_ids)` -> logits."""

    cfg: LlamaConfig
    decode: bool = False  # KV-cache mode for zoo.generate (see zoo/nn/attention.py)

    # The scanned block; zoo/models/moe/model.py swaps in one whose MLP is routed experts.
    block_cls: ClassVar[type[nn.Module]] = DecoderBlock

    def make_mlp(self, **kw) -> Callable[..., nn.Module]:
        """The per-layer MLP constructor: a gated (SwiGLU/GeGLU) MLP."""
        cfg = self.cfg
        return partial(MLP, cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, gated=True, **kw)

    def make_blocks(self, kinds, kw, **block_kwargs):
        """The scanned layers: `block_cls` over num_layers (the layer index goes in when kinds differ)."""
        del kw
        return scan_layers(self.block_cls, self.cfg.num_layers, self.cfg.remat, per_layer_index=len(kinds) > 1,
                           **block_kwargs)

    def layer_outputs(self, outputs_L, segment_ids_BT) -> None:
        """Receives what the scanned blocks return per layer (None for the dense MLP)."""
        del outputs_L, segment_ids_BT

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, *, positions=None, segment_ids=None, return_hidden=False,
                 return_head=False):
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        kw = dict(dtype=dtype, param_dtype=jnp.dtype(cfg.param_dtype))
        positions_BT = default_positions(input_ids) if positions is None else positions
        segment_ids_BT = mask_to_segment_ids(attention_mask, segment_ids)

        embed = Embed(cfg.vocab_size, cfg.hidden_size, name="embed_tokens", **kw)
        x_BTD = embed(input_ids)
        if cfg.embed_scale:  # Gemma rounds the normaliser to the compute dtype
            x_BTD = x_BTD * jnp.asarray(math.sqrt(cfg.hidden_size), dtype)
        x_BTD = constrain(x_BTD, ("batch", "length", "activation_embed"))

        kinds, kind_ids = cfg.attention_kinds()
        blocks = self.make_blocks(
            kinds, kw,
            make_norm=partial(RMSNorm, cfg.rms_norm_eps, cfg.norm_offset, **kw),
            make_attention=partial(
                SelfAttention, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                qkv_bias=cfg.attention_bias, out_bias=cfg.attention_out_bias, sinks=cfg.attention_sinks,
                rotary_dim=cfg.rotary_dim if cfg.rotary_dim != cfg.head_dim else None,
                qk_norm_eps=cfg.rms_norm_eps if cfg.qk_norm else None,
                qk_norm_offset=cfg.norm_offset, qk_norm_flat=cfg.qk_norm_flat, layer_kinds=kinds,
                layer_kind_ids=kind_ids, attention_impl=cfg.attention_impl, context_parallel=cfg.context_parallel,
                decode=self.decode,
                scale=None if cfg.query_pre_attn_scalar is None else cfg.query_pre_attn_scalar ** -0.5,
                logits_soft_cap=cfg.attn_logit_softcap,
                qk_l2_norm_eps=cfg.rms_norm_eps if cfg.qk_l2_norm else None,
                temperature_tuning=(cfg.floor_scale, cfg.attn_scale) if cfg.attn_temperature_tuning else None, **kw),
            make_mlp=self.make_mlp(**kw), norm_placement=cfg.norm_placement,
        )
        x_BTD, outputs_L = blocks(x_BTD, positions_BT, segment_ids_BT)
        self.layer_outputs(outputs_L, segment_ids_BT)
        x_BTD = RMSNorm(cfg.rms_norm_eps, cfg.norm_offset, name="norm", **kw)(x_BTD)
        if return_hidden:
            return x_BTD
        head = lm_head(cfg, embed, dtype, kw["param_dtype"], cfg.final_logit_softcap)
        return (x_BTD, head) if return_head else head.logits(x_BTD)
