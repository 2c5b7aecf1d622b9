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
from zoo.models.deepseek.routing import bias_update, route_grouped
from zoo.models.moe.model import AUX_LOSS_COLLECTION, ROUTER_LOAD, MoEDecoderBlock, aux_losses, dispatch_experts
from zoo.nn.blocks import DecoderBlock
from zoo.nn.embed import Embed
from zoo.nn.linear import Dense, default_init, param_with_axes
from zoo.nn.losses import next_token_targets, shift_left, vocab_cross_entropy_sums
from zoo.nn.masks import default_positions, mask_to_segment_ids
from zoo.nn.mla import MLAttention
from zoo.nn.mlp import MLP
from zoo.nn.norms import RMSNorm
from zoo.nn.scan import scan_layers
from zoo.nn.vocab_head import lm_head
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


class MTPLayer(nn.Module):
    """One multi-token-prediction depth (DeepSeek-V3 §2.2): `__call__(h_BTD, emb_BTD, positions_BT,
    segment_ids_BT) -> (head_norm(block(eh_proj([enorm(emb) | hnorm(h)]))), router statistics)`,
    where emb holds the embeddings of the tokens one further ahead than h's depth saw.

    Params: enorm/scale, hnorm/scale [D], eh_proj/kernel [2D, D], block/... (one MoE decoder
    layer), head_norm/scale [D] (HF shared_head.norm).
    """

    cfg: DeepSeekConfig
    make_norm: Any
    make_attention: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h_BTD, emb_BTD, positions_BT, segment_ids_BT):
        cfg, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        u_BTD = jnp.concatenate([RMSNorm(cfg.rms_norm_eps, name="enorm", **kw)(emb_BTD),
                                 RMSNorm(cfg.rms_norm_eps, name="hnorm", **kw)(h_BTD)], axis=-1)
        u_BTD = Dense((cfg.hidden_size,), ("mlp",), ("embed",), name="eh_proj", **kw)(u_BTD)
        g_BTD, stats = MoEDecoderBlock(self.make_norm, self.make_attention, partial(DeepSeekMoE, cfg, **kw),
                                        name="block")(
            u_BTD, positions_BT, segment_ids_BT)
        return RMSNorm(cfg.rms_norm_eps, name="head_norm", **kw)(g_BTD), stats


def balance_routers(cfg: DeepSeekConfig, params: dict, load_LE) -> dict:
    """DeepSeek-V3's auxiliary-loss-free balancing, after the optimizer's update: each MoE layer's
    correction bias moves by `bias_update_rate` toward balanced load, b_e += rate * sign(mean_e(load)
    - load_e), from the step's (token, expert) counts [moe layers, E] over the whole batch."""
    params = dict(params)
    stacks = ["layers"] + [f"mtp_{j}" for j in range(cfg.num_mtp_layers) if load_LE.shape[0] > cfg.moe_layers]
    row = 0
    for name in stacks:  # the MoE stack's rows, then one row per MTP depth (when MTP ran)
        mlp = dict(params[name]["mlp"] if name == "layers" else params[name]["block"]["mlp"])
        rows = cfg.moe_layers if name == "layers" else 1
        load = load_LE[row:row + rows] if name == "layers" else load_LE[row]
        mlp["correction_bias"] = bias_update(mlp["correction_bias"], load, cfg.bias_update_rate)
        params[name] = ({**params[name], "mlp": mlp} if name == "layers" else
                        {**params[name], "block": {**params[name]["block"], "mlp": mlp}})
        row += rows
    return params


class DeepSeek(nn.Module):
    """`apply(params, input_ids, attention_mask=None, *, positions, segment_ids)` -> logits; with
    mutable=["aux_loss"] the auxiliary losses too."""

    cfg: DeepSeekConfig
    decode: bool = False  # KV-cache mode for zoo.generate

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, *, positions=None, segment_ids=None, return_hidden=False,
                 return_head=False):
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
                attention_impl=cfg.attention_impl, context_parallel=cfg.context_parallel, decode=self.decode,
                kv_cache=cfg.kv_cache, **kw))
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
        counts = [stats_L["expert_counts"]]
        x_BTD = RMSNorm(cfg.rms_norm_eps, name="norm", **kw)(x_BTD)
        if return_hidden:
            return x_BTD
        head = lm_head(cfg, embed, kw["dtype"], kw["param_dtype"])
        # multi-token prediction: a training loss only (runs while the aux losses are collected, and at init)
        if cfg.num_mtp_layers and (self.is_initializing() or (
                cfg.mtp_loss_weight > 0 and self.is_mutable_collection(AUX_LOSS_COLLECTION))):
            h_BTD, losses = x_BTD, []
            for j in range(cfg.num_mtp_layers):
                emb_BTD = embed(shift_left(input_ids, j + 1))  # depth j embeds t_{i+j+1}, predicts t_{i+j+2}
                h_BTD, stats = MTPLayer(cfg, **blocks, name=f"mtp_{j}", **kw)(h_BTD, emb_BTD, positions_BT + j + 1,
                                                                            segment_ids_BT)
                counts.append(stats["expert_counts"][None])
                seg_BT = jnp.ones_like(input_ids) if segment_ids_BT is None else segment_ids_BT
                _, sums = vocab_cross_entropy_sums(h_BTD, head, *next_token_targets(input_ids, seg_BT, ahead=j + 2),
                                                   vocab_block=cfg.loss_vocab_block)
                losses.append(sums["nll"] / jnp.maximum(sums["weight"], 1.0))
            self.sow(AUX_LOSS_COLLECTION, "mtp_loss", sum(losses) / cfg.num_mtp_layers)
        self.sow(ROUTER_LOAD, "counts", jnp.concatenate(counts))  # for balance_routers; a no-op unless mutable
        return (x_BTD, head) if return_head else head.logits(x_BTD)

