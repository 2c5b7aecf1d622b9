"""BERT and RoBERTa / XLM-RoBERTa: learned absolute positions and token types,
post-LayerNorm encoder blocks, exact-erf GELU, and the three HF heads (*Model,
*ForMaskedLM, *ForSequenceClassification), chosen by `BertConfig.architecture`.

RoBERTa differs only in its position ids: real tokens count from pad_token_id + 1,
tokens equal to pad_token_id get pad_token_id (HF's create_position_ids_from_input_ids).

Padding follows HF exactly: an attention_mask hides padded *keys*, while padded
queries still attend to the real tokens (their outputs are computed, not zeroed).
Dropout is not modelled: the forward is the deterministic (eval) one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from zoo.models.bert.config import BertConfig
from zoo.nn.attention import SelfAttention
from zoo.nn.embed import Embed
from zoo.nn.linear import Dense, param_with_axes
from zoo.nn.masks import check_inputs, default_positions, encoder_segment_ids
from zoo.nn.mlp import MLP
from zoo.nn.norms import LayerNorm
from zoo.nn.scan import scan_layers
from zoo.nn.vocab_head import VocabHead
from zoo.sharding import constrain


class BertLayer(nn.Module):
    """Post-LN block: x = norm(x + attn(x)); x = norm(x + mlp(x)). Scanned over layers."""

    cfg: BertConfig

    @nn.compact
    def __call__(self, x_BTD, segment_ids):
        cfg = self.cfg
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        x_BTD = constrain(x_BTD, ("batch", "length", "activation_embed"))
        attn = SelfAttention(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, qkv_bias=True,
                             out_bias=True, causal=False, attention_impl=cfg.attention_impl, name="attn", **kw)
        x_BTD = LayerNorm(cfg.layer_norm_eps, name="attn_norm", **kw)(x_BTD + attn(x_BTD, None, segment_ids))
        mlp = MLP(cfg.hidden_size, cfg.intermediate_size, "gelu", gated=False, use_bias=True, name="mlp", **kw)
        x_BTD = LayerNorm(cfg.layer_norm_eps, name="mlp_norm", **kw)(x_BTD + mlp(x_BTD))
        return constrain(x_BTD, ("batch", "length", "activation_embed")), None


def _square(features: int, name: str, kw: dict) -> Dense:
    # A [D, D] kernel cannot name "embed" twice (one mesh axis per array dim), so the
    # output side takes the tensor-parallel "mlp" name.
    return Dense((features,), ("embed",), ("mlp",), use_bias=True, name=name, **kw)


class Bert(nn.Module):
    """`apply(params, input_ids, attention_mask=None, token_type_ids=None, *, positions, segment_ids)`.

    Returns last_hidden_state [B, T, D] (*Model; with `return_pooled=True` the pair
    (last_hidden_state, pooler_output)), MLM logits [B, T, V] (*ForMaskedLM) or
    class logits [B, num_labels] (*ForSequenceClassification). `positions` (0-based
    within each document) and `segment_ids` serve packed training rows; they default
    to 0..T-1 (RoBERTa: counted over the non-pad ids) and the mask.
    """

    cfg: BertConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *, positions=None, segment_ids=None,
                 return_pooled=False, return_head=False):
        cfg = self.cfg
        check_inputs(cfg, input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                     positions=positions, segment_ids=segment_ids)
        b, t = input_ids.shape
        if t > cfg.max_seq_len:
            raise ValueError(f"{cfg.name}: input length {t} exceeds the {cfg.max_seq_len} positions of the model")
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        if cfg.position_offset and positions is None:  # RoBERTa: from the ids, as fairseq and HF
            real_BT = (input_ids != cfg.pad_token_id).astype(jnp.int32)
            positions_BT = jnp.cumsum(real_BT, axis=1) * real_BT + cfg.pad_token_id
        else:
            positions_BT = (default_positions(input_ids) if positions is None else positions) + cfg.position_offset
        types_BT = jnp.zeros_like(input_ids) if token_type_ids is None else token_type_ids

        word = Embed(cfg.vocab_size, cfg.hidden_size, name="word_embeddings", **kw)
        position_rows = cfg.max_seq_len + cfg.position_offset
        x_BTD = (word(input_ids)
                 + Embed(position_rows, cfg.hidden_size, axes=("positions", "embed"), name="position_embeddings",
                         **kw)(positions_BT)
                 + Embed(cfg.type_vocab_size, cfg.hidden_size, axes=(None, "embed"), name="token_type_embeddings",
                         **kw)(types_BT))
        x_BTD = LayerNorm(cfg.layer_norm_eps, name="embed_norm", **kw)(x_BTD)

        layers = scan_layers(BertLayer, cfg.num_layers, cfg.remat, cfg=cfg)
        x_BTD, _ = layers(x_BTD, encoder_segment_ids(attention_mask, segment_ids, b, t))
        x_BTD = constrain(x_BTD, ("batch", "length", "activation_embed"))

        if cfg.head == "mlm":
            h_BTD = jax.nn.gelu(_square(cfg.hidden_size, "mlm_dense", kw)(x_BTD), approximate=False)
            h_BTD = LayerNorm(cfg.layer_norm_eps, name="mlm_norm", **kw)(h_BTD)
            mlm_bias = self.param("mlm_bias", param_with_axes(nn.initializers.zeros, ("vocab",)), (cfg.vocab_size,),
                                  kw["param_dtype"])
            head = VocabHead(word.embedding, mlm_bias, dtype=kw["dtype"])
            return (h_BTD, head) if return_head else head.logits(h_BTD)
        if return_head:
            raise ValueError(f"{cfg.name}: return_head needs the mlm head, this model has head={cfg.head!r}")

        pooled_BD = jnp.tanh(_square(cfg.hidden_size, "pooler", kw)(x_BTD[:, 0]))
        if cfg.head == "classify":
            classifier = Dense((cfg.num_labels,), ("embed",), ("classes",), use_bias=True, name="classifier", **kw)
            return classifier(pooled_BD).astype(jnp.float32)
        return (x_BTD, pooled_BD) if return_pooled else x_BTD


def build_bert(cfg: BertConfig) -> Bert:
    """The Module for any BERT architecture (the head is chosen by cfg.architecture)."""
    return Bert(cfg)
