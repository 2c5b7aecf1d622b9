"""DeepSeek decoders (DeepseekV3ForCausalLM, DeepseekV2ForCausalLM): multi-head latent attention
(zoo/nn/mla.py) in every layer; the first `first_k_dense_replace` layers with a dense gated MLP
(scanned as `dense_layers`), the rest with DeepSeekMoE (scanned as `layers`): routed experts
through the moe family's dropless dispatch, chosen by zoo/models/deepseek/routing.py, plus
shared experts every token goes through. The MoE layers' router statistics give the moe
family's load-balancing and z losses ("aux_loss" collection, zoo/objectives.py).

Letters (STYLE.md, plus): E experts, k experts per token, N flattened tokens (in the MoE).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from zoo.models.deepseek.config import DeepSeekConfig
from zoo.models.deepseek.routing import route_grouped
from zoo.models.moe.model import AUX_LOSS_COLLECTION, MoEDecoderBlock, aux_losses, dispatch_experts
from zoo.nn.blocks import DecoderBlock
from zoo.nn.embed import Embed
from zoo.nn.linear import Dense, default_init, param_with_axes
from zoo.nn.masks import default_positions, mask_to_segment_ids
from zoo.nn.mla import MLAttention
from zoo.nn.mlp import MLP
from zoo.nn.norms import RMSNorm
from zoo.nn.scan import scan_layers
from zoo.sharding import constrain


class DeepSeekMoE(nn.Module):
    """Routed experts plus shared experts. `__call__(x_BTD, segment_ids_BT) -> (y_BTD, router
    statistics)` with the statistics of zoo/models/moe/model.py `MoEMLP`.

    Params: router/kernel [D, E] (float32 logits), correction_bias [E] (topk_method "noaux_tc":
    added to the scores for the choice only; trained by no gradient), gate_proj / up_proj
    [E, D, F], down_proj [E, F, D], shared_experts/{gate,up,down}_proj (width n_shared * F).
    """

    cfg: DeepSeekConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BTD, segment_ids_BT=None):
        cfg = self.cfg
        b, t, d = x_BTD.shape
        e, f = cfg.num_experts, cfg.moe_intermediate_size
        x_ND = x_BTD.reshape(b * t, d)
        logits_NE = Dense((e,), ("embed",), (None,), name="router", dtype=jnp.float32,
                          param_dtype=self.param_dtype)(x_ND)
        bias_E = None
        if cfg.topk_method == "noaux_tc":
            bias_E = jax.lax.stop_gradient(self.param("correction_bias", param_with_axes(nn.initializers.zeros,
                                                                                        (None,)), (e,), jnp.float32))
        weights_Nk, experts_Nk, probs_NE = route_grouped(
            logits_NE, bias_E, k=cfg.num_experts_per_tok, method=cfg.topk_method, n_group=cfg.n_group,
            topk_group=cfg.topk_group, normalize=cfg.norm_topk_prob, scale=cfg.routed_scaling_factor)

        def expert_param(name, shape, axes):
            return self.param(name, param_with_axes(default_init, axes), shape, self.param_dtype).astype(self.dtype)

        y_ND = dispatch_experts(x_ND.astype(self.dtype), experts_Nk, weights_Nk,
                                expert_param("gate_proj", (e, d, f), ("expert", "embed", "mlp")),
                                expert_param("up_proj", (e, d, f), ("expert", "embed", "mlp")),
                                expert_param("down_proj", (e, f, d), ("expert", "mlp", "embed")),
                                lambda gate, up: jax.nn.silu(gate) * up)
        shared = MLP(d, cfg.n_shared_experts * f, "silu", gated=True, name="shared_experts", dtype=self.dtype,
                     param_dtype=self.param_dtype)
        y_ND = shared(x_BTD).reshape(b * t, d) + y_ND

        valid_N = (jnp.ones((b * t,), jnp.float32) if segment_ids_BT is None
                   else (segment_ids_BT.reshape(-1) > 0).astype(jnp.float32))
        stats = {
            "expert_counts": jnp.zeros((e,), jnp.float32).at[experts_Nk].add(
                jnp.broadcast_to(valid_N[:, None], experts_Nk.shape)),
            "expert_probs": jnp.sum(probs_NE * valid_N[:, None], axis=0),
            "router_z": jnp.sum(jnp.square(jax.nn.logsumexp(logits_NE, axis=-1)) * valid_N),
            "tokens": jnp.sum(valid_N),
        }
        return y_ND.reshape(b, t, d), stats


class DeepSeek(nn.Module):
    """`apply(params, input_ids, attention_mask=None, *, positions, segment_ids)` -> logits; with
    mutable=["aux_loss"] the auxiliary losses too."""

    cfg: DeepSeekConfig
    decode: bool = False  # KV-cache mode for zoo.generate

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, *, positions=None, segment_ids=None, return_hidden=False):
        cfg = self.cfg
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        positions_BT = default_positions(input_ids) if positions is None else positions
        segment_ids_BT = mask_to_segment_ids(attention_mask, segment_ids)
        embed = Embed(cfg.vocab_size, cfg.hidden_size, name="embed_tokens", **kw)
        x_BTD = constrain(embed(input_ids), ("batch", "length", "activation_embed"))
        blocks = dict(
            make_norm=partial(RMSNorm, cfg.rms_norm_eps, **kw),
            make_attention=partial(
                MLAttention, cfg.hidden_size, cfg.num_heads, cfg.q_lora_rank, cfg.kv_lora_rank,
                cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.softmax_scale,
                rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling, rope_factor=cfg.rope_factor,
                attention_impl=cfg.attention_impl, decode=self.decode, kv_cache=cfg.kv_cache, **kw))
        if cfg.first_k_dense_replace:
            dense = scan_layers(DecoderBlock, cfg.first_k_dense_replace, cfg.remat, name="dense_layers",
                                make_mlp=partial(MLP, cfg.hidden_size, cfg.intermediate_size, "silu", gated=True,
                                                 **kw), **blocks)
            x_BTD, _ = dense(x_BTD, positions_BT, segment_ids_BT)
        moe = scan_layers(MoEDecoderBlock, cfg.moe_layers, cfg.remat, name="layers",
                          make_mlp=partial(DeepSeekMoE, cfg, **kw), **blocks)
        x_BTD, stats_L = moe(x_BTD, positions_BT, segment_ids_BT)
        for name, value in aux_losses(stats_L, cfg.num_experts).items():
            self.sow(AUX_LOSS_COLLECTION, name, value)
        x_BTD = RMSNorm(cfg.rms_norm_eps, name="norm", **kw)(x_BTD)
        if return_hidden:
            return x_BTD
        if cfg.tie_word_embeddings:
            logits_BTV = embed.attend(x_BTD)
        else:
            logits_BTV = Dense((cfg.vocab_size,), ("embed",), ("vocab",), name="lm_head", **kw)(x_BTD)
        return constrain(logits_BTV.astype(jnp.float32), ("batch", "length", "activation_vocab"))
