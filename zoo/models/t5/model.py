"""T5ForConditionalGeneration: a pre-norm encoder and a decoder with causal self-attention
and cross-attention, bucketed relative position biases, RMS-style layer norm (no mean,
no bias) and unscaled attention (scale=1.0).

v1.0 uses a ReLU MLP and an LM head tied to the shared embedding, with the decoder
output scaled by hidden_size**-0.5 first; v1.1 / Flan-T5 use gated tanh-GELU and an
untied head. Each stack owns one relative-attention table, computed once before the
layer scan and shared by every layer (HF stores it in block 0); UMT5 gives each layer's
self-attention its own table (scanned with the layer). mT5 is v1.1 that never scales the
decoder output. Attention that takes
the position bias runs with implementation="xla" explicitly: the fused kernels take
no additive bias and nothing falls back silently. Dropout is not modelled.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from flax import linen as nn

import kernels
from zoo.models.t5.config import T5Config
from zoo.nn.embed import Embed
from zoo.nn.linear import Dense, default_init, param_with_axes
from zoo.nn.masks import check_inputs, encoder_segment_ids
from zoo.nn.mlp import MLP
from zoo.nn.norms import RMSNorm
from zoo.nn.scan import scan_layers
from zoo.nn.vocab_head import lm_head
from zoo.sharding import constrain


def relative_position_buckets(q_len: int, kv_len: int, *, bidirectional: bool, num_buckets: int,
                              max_distance: int) -> np.ndarray:
    """Bucket index [T, S] of each (query, key) offset key - query, as Mesh TensorFlow / HF T5.

    Half the buckets (per direction when bidirectional) hold exact small offsets, the
    rest grow logarithmically up to max_distance. Lengths are static, so this is host
    numpy, written as the same float32 steps as PyTorch so boundary offsets agree.
    """
    offset_TS = np.arange(kv_len)[None, :] - np.arange(q_len)[:, None]
    bucket_TS = np.zeros_like(offset_TS)
    if bidirectional:
        num_buckets //= 2
        bucket_TS += (offset_TS > 0) * num_buckets
        distance_TS = np.abs(offset_TS)
    else:
        distance_TS = -np.minimum(offset_TS, 0)
    max_exact = num_buckets // 2
    is_small = distance_TS < max_exact
    ratio = np.maximum(distance_TS, 1).astype(np.float32) / np.float32(max_exact)
    log_scaled = (np.log(ratio) / np.float32(math.log(max_distance / max_exact))
                  * np.float32(num_buckets - max_exact))
    large_TS = np.minimum(max_exact + log_scaled.astype(np.int64), num_buckets - 1)
    return bucket_TS + np.where(is_small, distance_TS, large_TS)


def shift_right(ids_BT, start_id: int):
    """Decoder inputs from targets: start_id, then the targets without their last token."""
    return jnp.concatenate([jnp.full_like(ids_BT[:, :1], start_id), ids_BT[:, :-1]], axis=1)


def position_bias(module: nn.Module, cfg: T5Config, bucket_TS) -> jnp.ndarray:
    """The module's relative-attention table [buckets, N] looked up at bucket_TS: [1, N, T, S] float32."""
    table_bN = module.param("relative_attention_bias", param_with_axes(default_init, ("relpos_buckets", "heads")),
                            (cfg.relative_attention_num_buckets, cfg.num_heads), jnp.dtype(cfg.param_dtype))
    return jnp.take(table_bN.astype(jnp.float32), bucket_TS, axis=0).transpose(2, 0, 1)[None]


class T5Attention(nn.Module):
    """Attention of queries from x over keys/values from kv (x itself for self-attention).

    `bias_1NTS` is the stack's position bias, or (own_table: UMT5) the bucket ids [T, S]
    that this attention looks up in its own table."""

    cfg: T5Config
    causal: bool = False
    own_table: bool = False

    @nn.compact
    def __call__(self, x_BTD, kv_BSD, bias_1NTS, segment_ids):
        cfg = self.cfg
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        n, h = cfg.num_heads, cfg.head_dim
        if self.own_table:
            bias_1NTS = position_bias(self, cfg, bias_1NTS)
        q_BTNH = Dense((n, h), ("embed",), ("heads", "head_dim"), name="q_proj", **kw)(x_BTD)
        k_BSNH = Dense((n, h), ("embed",), ("kv_heads", "head_dim"), name="k_proj", **kw)(kv_BSD)
        v_BSNH = Dense((n, h), ("embed",), ("kv_heads", "head_dim"), name="v_proj", **kw)(kv_BSD)
        impl = "xla" if bias_1NTS is not None else cfg.attention_impl
        out_BTNH = kernels.attention(q_BTNH, k_BSNH, v_BSNH, causal=self.causal, segment_ids=segment_ids, scale=1.0,
                                     bias=bias_1NTS, implementation=impl)
        out_BTNH = constrain(out_BTNH, ("batch", "length", "activation_heads", None))
        return Dense((cfg.hidden_size,), ("heads", "head_dim"), ("embed",), name="o_proj", **kw)(out_BTNH)


def _mlp(cfg: T5Config, kw: dict) -> MLP:
    if cfg.feed_forward_proj == "gated-gelu":  # HF wi_0 (gate, gelu_new), wi_1 (linear), wo
        return MLP(cfg.hidden_size, cfg.intermediate_size, "gelu_tanh", gated=True, name="mlp", **kw)
    return MLP(cfg.hidden_size, cfg.intermediate_size, "relu", gated=False, name="mlp", **kw)


class T5EncoderLayer(nn.Module):
    """x + attn(norm(x)) with the position bias, then x + mlp(norm(x))."""

    cfg: T5Config

    @nn.compact
    def __call__(self, x_BTD, bias_1NTS, segment_ids):
        cfg = self.cfg
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        x_BTD = constrain(x_BTD, ("batch", "length", "activation_embed"))
        h_BTD = RMSNorm(cfg.layer_norm_epsilon, name="self_attn_norm", **kw)(x_BTD)
        attn = T5Attention(cfg, own_table=cfg.relative_bias_per_layer, name="self_attn")
        x_BTD = x_BTD + attn(h_BTD, h_BTD, bias_1NTS, segment_ids)
        x_BTD = x_BTD + _mlp(cfg, kw)(RMSNorm(cfg.layer_norm_epsilon, name="mlp_norm", **kw)(x_BTD))
        return constrain(x_BTD, ("batch", "length", "activation_embed")), None


class T5DecoderLayer(nn.Module):
    """Causal self-attention (with the bias), cross-attention over the encoder, MLP; all pre-norm."""

    cfg: T5Config

    @nn.compact
    def __call__(self, y_BTD, enc_BSD, bias_1NTT, self_ids, cross_ids):
        cfg = self.cfg
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        y_BTD = constrain(y_BTD, ("batch", "length", "activation_embed"))
        h_BTD = RMSNorm(cfg.layer_norm_epsilon, name="self_attn_norm", **kw)(y_BTD)
        attn = T5Attention(cfg, causal=True, own_table=cfg.relative_bias_per_layer, name="self_attn")
        y_BTD = y_BTD + attn(h_BTD, h_BTD, bias_1NTT, self_ids)
        h_BTD = RMSNorm(cfg.layer_norm_epsilon, name="cross_attn_norm", **kw)(y_BTD)
        y_BTD = y_BTD + T5Attention(cfg, name="cross_attn")(h_BTD, enc_BSD, None, cross_ids)
        y_BTD = y_BTD + _mlp(cfg, kw)(RMSNorm(cfg.layer_norm_epsilon, name="mlp_norm", **kw)(y_BTD))
        return constrain(y_BTD, ("batch", "length", "activation_embed")), None


class T5Stack(nn.Module):
    """Encoder (decoder=False) or decoder: its relative-position table, scanned layers, final norm."""

    cfg: T5Config
    decoder: bool = False

    @nn.compact
    def __call__(self, x_BTD, segment_ids, enc_BSD=None, cross_ids=None):
        cfg = self.cfg
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        t = x_BTD.shape[1]
        bucket_TT = relative_position_buckets(t, t, bidirectional=not self.decoder,
                                              num_buckets=cfg.relative_attention_num_buckets,
                                              max_distance=cfg.relative_attention_max_distance)
        # UMT5: every layer looks the buckets up in its own table; T5: one bias for the stack
        bias_1NTT = (jnp.asarray(bucket_TT, jnp.int32) if cfg.relative_bias_per_layer
                     else position_bias(self, cfg, bucket_TT))
        if self.decoder:
            layers = scan_layers(T5DecoderLayer, cfg.num_decoder_layers, cfg.remat, cfg=cfg)
            x_BTD, _ = layers(x_BTD, enc_BSD, bias_1NTT, segment_ids, cross_ids)
        else:
            x_BTD, _ = scan_layers(T5EncoderLayer, cfg.num_layers, cfg.remat, cfg=cfg)(x_BTD, bias_1NTT, segment_ids)
        return RMSNorm(cfg.layer_norm_epsilon, name="final_norm", **kw)(x_BTD)


class T5(nn.Module):
    """`apply(params, input_ids, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None)` -> logits.

    logits are [B, T_dec, V] float32. decoder_input_ids defaults to input_ids shifted
    right (so `init` needs only input_ids). Packed training rows pass `segment_ids`
    (encoder) and `decoder_segment_ids` (decoder; each target token carries the id of
    its source document) instead of the masks. For generation, `encode_only=True`
    returns the encoder output [B, S, D] and `encoder_outputs=` reuses it (as in HF).
    """

    cfg: T5Config

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None, *,
                 segment_ids=None, decoder_segment_ids=None, encoder_outputs=None, encode_only=False,
                 return_hidden=False, return_head=False):
        cfg = self.cfg
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        if decoder_input_ids is None:
            decoder_input_ids = shift_right(input_ids, cfg.decoder_start_token_id)
        check_inputs(cfg, input_ids, attention_mask=attention_mask, segment_ids=segment_ids)
        check_inputs(cfg, decoder_input_ids, decoder_attention_mask=decoder_attention_mask,
                     decoder_segment_ids=decoder_segment_ids)
        if (segment_ids is None) != (decoder_segment_ids is None):
            raise ValueError(f"{cfg.name}: packed rows need both segment_ids and decoder_segment_ids")
        (b, s), t = input_ids.shape, decoder_input_ids.shape[1]
        if decoder_input_ids.shape[0] != b:
            raise ValueError(f"{cfg.name}: decoder_input_ids has batch {decoder_input_ids.shape[0]}, input_ids {b}")

        enc_ids = encoder_segment_ids(attention_mask, segment_ids, b, s)
        self_ids = encoder_segment_ids(decoder_attention_mask, decoder_segment_ids, b, t)
        if decoder_segment_ids is not None:
            cross_ids = (decoder_segment_ids.astype(jnp.int32), segment_ids.astype(jnp.int32))
        elif attention_mask is not None:
            cross_ids = (jnp.ones((b, t), jnp.int32), (attention_mask != 0).astype(jnp.int32))
        else:
            cross_ids = None

        shared = Embed(cfg.vocab_size, cfg.hidden_size, name="shared", **kw)
        if encoder_outputs is None:
            enc_BSD = T5Stack(cfg, name="encoder")(shared(input_ids), enc_ids)
        elif encoder_outputs.shape != (b, s, cfg.hidden_size):
            raise ValueError(f"{cfg.name}: encoder_outputs must be {(b, s, cfg.hidden_size)}, "
                             f"got {encoder_outputs.shape}")
        else:
            enc_BSD = encoder_outputs
        if encode_only:
            return enc_BSD
        y_BTD = T5Stack(cfg, decoder=True, name="decoder")(shared(decoder_input_ids), self_ids, enc_BSD, cross_ids)
        if return_hidden:
            return y_BTD
        if cfg.scale_decoder_outputs:
            y_BTD = y_BTD * jnp.asarray(cfg.hidden_size**-0.5, y_BTD.dtype)
        head = lm_head(cfg, shared, kw["dtype"], kw["param_dtype"])
        return (y_BTD, head) if return_head else head.logits(y_BTD)
