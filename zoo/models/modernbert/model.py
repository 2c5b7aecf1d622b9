"""ModernBertModel / ModernBertForMaskedLM / ModernBertForSequenceClassification.

Pre-norm encoder blocks x + attn(norm(x)), x + mlp(norm(x)) with LayerNorms and linear layers
without biases, RoPE (a base per layer kind), GeGLU (exact GELU on the first half of Wi, times
the second) and global layers every `global_attn_every_n_layers`-th layer among local ones
whose window reaches local_attention // 2 tokens each way. The first layer has no norm
before its attention, so it sits before the scanned stack of the others (`first_layer`).
Local layers run attention with implementation="xla" and the window as an additive bias:
`kernels.attention`'s window only reaches back (causal decoders); global layers use the
configured implementation. Padding hides keys only (as HF). Dropout is not modelled.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from zoo.models.modernbert.config import ModernBertConfig
from zoo.nn.attention import SelfAttention
from zoo.nn.embed import Embed
from zoo.nn.linear import Dense, param_with_axes
from zoo.nn.masks import check_inputs, default_positions, encoder_segment_ids
from zoo.nn.mlp import MLP
from zoo.nn.norms import LayerNorm
from zoo.nn.scan import scan_layers
from zoo.nn.vocab_head import VocabHead
from zoo.sharding import constrain


class ModernBertLayer(nn.Module):
    """x + attn(attn_norm(x)) (no attn_norm in the first layer), then x + mlp(mlp_norm(x))."""

    cfg: ModernBertConfig
    first: bool = False  # layer 0: no attn_norm, always global
    kind_ids: tuple[int, ...] = ()  # the scanned layers' kinds (index into cfg.attention_kinds()[0])

    @nn.compact
    def __call__(self, x_BTD, positions_BT, segment_ids, layer=None):
        cfg = self.cfg
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        kinds = cfg.attention_kinds()[0]
        x_BTD = constrain(x_BTD, ("batch", "length", "activation_embed"))
        attn = SelfAttention(cfg.hidden_size, cfg.num_heads, cfg.num_heads, cfg.head_dim, causal=False,
                             window_both_ways=True, layer_kinds=kinds[:1] if self.first else kinds,
                             layer_kind_ids=None if self.first else self.kind_ids,
                             attention_impl=cfg.attention_impl, name="attn", **kw)
        norm = lambda name: LayerNorm(cfg.norm_eps, use_bias=False, name=name, **kw)
        h_BTD = x_BTD if self.first else norm("attn_norm")(x_BTD)
        x_BTD = x_BTD + attn(h_BTD, positions_BT, segment_ids, layer)
        mlp = MLP(cfg.hidden_size, cfg.intermediate_size, "gelu", gated=True, name="mlp", **kw)
        x_BTD = x_BTD + mlp(norm("mlp_norm")(x_BTD))
        return constrain(x_BTD, ("batch", "length", "activation_embed")), None


def _square(features: int, name: str, kw: dict) -> Dense:
    # [D, D]: the output side takes the tensor-parallel "mlp" name (one mesh axis per array dim)
    return Dense((features,), ("embed",), ("mlp",), use_bias=False, name=name, **kw)


class ModernBert(nn.Module):
    """`apply(params, input_ids, attention_mask=None, *, positions, segment_ids)` -> last_hidden_state
    [B, T, D] (ModernBertModel), MLM logits [B, T, V] or class logits [B, num_labels]."""

    cfg: ModernBertConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, *, positions=None, segment_ids=None, return_head=False):
        cfg = self.cfg
        check_inputs(cfg, input_ids, attention_mask=attention_mask, positions=positions, segment_ids=segment_ids)
        b, t = input_ids.shape
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        positions_BT = default_positions(input_ids) if positions is None else positions
        ids = encoder_segment_ids(attention_mask, segment_ids, b, t)
        norm = lambda name: LayerNorm(cfg.norm_eps, use_bias=False, name=name, **kw)

        embed = Embed(cfg.vocab_size, cfg.hidden_size, name="tok_embeddings", **kw)
        x_BTD = norm("embed_norm")(embed(input_ids))
        x_BTD, _ = ModernBertLayer(cfg, first=True, name="first_layer")(x_BTD, positions_BT, ids)
        kind_ids = cfg.attention_kinds()[1][1:]
        if kind_ids:
            layers = scan_layers(ModernBertLayer, cfg.num_layers - 1, cfg.remat, per_layer_index=True, cfg=cfg,
                                 kind_ids=kind_ids)
            x_BTD, _ = layers(x_BTD, positions_BT, ids)
        x_BTD = norm("final_norm")(x_BTD)
        if cfg.head == "model":
            return x_BTD

        def head(h):  # ModernBertPredictionHead: dense, GELU, norm
            return norm("head_norm")(jax.nn.gelu(_square(cfg.hidden_size, "head_dense", kw)(h), approximate=False))

        if cfg.head == "mlm":
            bias = self.param("decoder_bias", param_with_axes(nn.initializers.zeros, ("vocab",)), (cfg.vocab_size,),
                              kw["param_dtype"])
            h_BTD, vocab = head(x_BTD), VocabHead(embed.embedding, bias, dtype=kw["dtype"])
            return (h_BTD, vocab) if return_head else vocab.logits(h_BTD)
        if return_head:
            raise ValueError(f"{cfg.name}: return_head needs the mlm head, this model has head={cfg.head!r}")
        if cfg.classifier_pooling == "cls":
            pooled_BD = x_BTD[:, 0]
        else:  # mean over real tokens (all, without a mask)
            real_BT = (jnp.ones((b, t)) if attention_mask is None and segment_ids is None else
                       ((segment_ids if segment_ids is not None else attention_mask) > 0)).astype(x_BTD.dtype)
            # a row with no real token (a batch's filler row in fine-tuning) pools to zeros, not 0/0
            pooled_BD = jnp.einsum("BTD,BT->BD", x_BTD, real_BT) / jnp.maximum(jnp.sum(real_BT, axis=1, keepdims=True),
                                                                                1.0)
        classifier = Dense((cfg.num_labels,), ("embed",), ("classes",), use_bias=True, name="classifier", **kw)
        return classifier(head(pooled_BD)).astype(jnp.float32)


def build_modernbert(cfg: ModernBertConfig) -> ModernBert:
    return ModernBert(cfg)
