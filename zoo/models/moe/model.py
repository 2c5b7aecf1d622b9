"""Mixture-of-experts decoders: Mixtral, Qwen3-MoE, GPT-OSS and Llama 4.

The Llama decoder (zoo/models/llama/model.py: attention, norms, RoPE, layer scan) with each
layer's MLP replaced by `MoEMLP`: a top-k router over E SwiGLU experts and a
capacity-free (dropless) dispatch. Every token's k (token, expert) pairs are sorted
by expert and the experts run as one grouped matmul (`jax.lax.ragged_dot`) over the
sorted rows, so no token is ever dropped however unbalanced the routing.

GPT-OSS adds a router bias, expert biases and its clamped SwiGLU
(`clamped_swiglu`); its routing (softmax over the top-k logits) is the renormalised
top-k of the full softmax, so `route` serves it unchanged.

Llama 4 routes by `route_sigmoid` (the sigmoid of each kept logit scales the expert's
input, not its output), adds a shared expert, and (Maverick) routes only every
`moe_layer_step`-th layer: `Llama4Block` is one scanned step of that many layers, the last
one routed and the others dense.

Expert weights carry the logical axis `expert` (zoo/sharding.py maps it to the
`expert` mesh axis) beside `embed` (fsdp) and `mlp` (tensor).

Training losses: each layer returns router statistics through the layer scan, and
the model sows two scalars into the "aux_loss" collection, which
`zoo.objectives` adds to the loss with the weights of `cfg.aux_loss_weights`:
  * load_balancing_loss: HF's `load_balancing_loss_func` (Switch Transformer eq. 4-6
    with top-k counts), pooled over all layers and the non-padding tokens;
  * router_z_loss: mean over layers and tokens of logsumexp(router logits)^2 (ST-MoE).

Letters (STYLE.md, plus): E experts, k experts per token, M = N*k routed rows,
N flattened tokens (B*T).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

from zoo.models.llama.model import Llama
from zoo.models.moe.config import MoEConfig
from zoo.nn.blocks import DecoderBlock
from zoo.nn.linear import Dense, default_init, param_with_axes
from zoo.nn.mlp import ACTIVATIONS, MLP
from zoo.nn.scan import scan_layers
from zoo.sharding import constrain

AUX_LOSS_COLLECTION = "aux_loss"
ROUTER_LOAD = "router_load"  # expert loads for a non-gradient router update (zoo/objectives.py)


def route(logits_NE, k: int, normalize: bool):
    """Top-k routing: softmax over all experts, keep the k largest (renormalised if asked).

    Returns (weights [N, k] float32, experts [N, k] int32, probabilities [N, E] float32).
    Mixtral always renormalises; Qwen3-MoE does when norm_topk_prob.
    """
    probs_NE = jax.nn.softmax(logits_NE.astype(jnp.float32), axis=-1)
    weights_Nk, experts_Nk = jax.lax.top_k(probs_NE, k)
    if normalize:
        weights_Nk = weights_Nk / jnp.sum(weights_Nk, axis=-1, keepdims=True)
    return weights_Nk, experts_Nk.astype(jnp.int32), probs_NE


def route_sigmoid(logits_NE, k: int):
    """Llama 4's routing: the k largest logits, each weighted by its sigmoid (no softmax, no
    renormalising). Returns (weights [N, k], experts [N, k], softmax probabilities [N, E]); the
    probabilities feed only the load-balancing statistics."""
    logits_NE = logits_NE.astype(jnp.float32)
    top_Nk, experts_Nk = jax.lax.top_k(logits_NE, k)
    return jax.nn.sigmoid(top_Nk), experts_Nk.astype(jnp.int32), jax.nn.softmax(logits_NE, axis=-1)


def clamped_swiglu(alpha: float, limit: float) -> Callable:
    """GPT-OSS's expert activation: (clip(up, -limit, limit) + 1) * g * sigmoid(alpha * g),
    g = min(gate, limit)."""
    def glu(gate, up):
        gate = jnp.minimum(gate, limit)
        up = jnp.clip(up, -limit, limit)
        return (up + 1.0) * (gate * jax.nn.sigmoid(alpha * gate))
    return glu


def dispatch_experts(x_ND, experts_Nk, weights_Nk, w_gate_EDF, w_up_EDF, w_down_EFD, glu: Callable,
                     biases=None, scale_inputs: bool = False):
    """Dropless expert computation: sum_j weights[n, j] * expert_{experts[n, j]}(x[n]), where
    expert e(x) = glu(x W_gate[e] + b_gate[e], x W_up[e] + b_up[e]) W_down[e] + b_down[e]
    (`biases` = (b_gate [E, F], b_up [E, F], b_down [E, D]) or None); with `scale_inputs`
    (Llama 4) sum_j expert_{experts[n, j]}(weights[n, j] * x[n]) instead.

    The N*k (token, expert) pairs are sorted by expert so that each expert's rows are
    contiguous; `ragged_dot` multiplies every group by its own expert's matrices with
    group sizes counted from the routing (no capacity, nothing dropped, nothing padded).
    """
    n, k = experts_Nk.shape
    num_experts = w_gate_EDF.shape[0]
    experts_M = experts_Nk.reshape(-1)
    order_M = jnp.argsort(experts_M, stable=True)  # row m of the sorted list is pair order_M[m]
    group_sizes_E = jnp.bincount(experts_M, length=num_experts).astype(jnp.int32)
    x_sorted_MD = jnp.take(x_ND, order_M // k, axis=0)
    if scale_inputs:
        x_sorted_MD = x_sorted_MD * jnp.take(weights_Nk.reshape(-1), order_M)[:, None].astype(x_sorted_MD.dtype)
        weights_Nk = jnp.ones_like(weights_Nk)
    gate_MF = jax.lax.ragged_dot(x_sorted_MD, w_gate_EDF, group_sizes_E)
    up_MF = jax.lax.ragged_dot(x_sorted_MD, w_up_EDF, group_sizes_E)
    if biases is not None:
        sorted_experts_M = jnp.take(experts_M, order_M)
        b_gate, b_up, b_down = (jnp.take(b, sorted_experts_M, axis=0) for b in biases)
        gate_MF, up_MF = gate_MF + b_gate, up_MF + b_up
    y_sorted_MD = jax.lax.ragged_dot(glu(gate_MF, up_MF), w_down_EFD, group_sizes_E)
    if biases is not None:
        y_sorted_MD = y_sorted_MD + b_down
    y_MD = jnp.zeros_like(y_sorted_MD).at[order_M].set(y_sorted_MD, unique_indices=True)
    return jnp.einsum("NkD,Nk->ND", y_MD.reshape(n, k, -1), weights_Nk.astype(y_MD.dtype))


class MoEMLP(nn.Module):
    """Routed SwiGLU experts. `__call__(x_BTD, segment_ids_BT) -> (y_BTD, router statistics)`.

    Params: router/kernel [D, E] (float32 logits), gate_proj and up_proj [E, D, F],
    down_proj [E, F, D]. The statistics (sums over this layer's non-padding tokens) are
    what the load-balancing and z losses need: expert_counts [E] (top-k assignments),
    expert_probs [E] (router probabilities), router_z (sum of logsumexp^2), tokens.
    """

    hidden_size: int
    intermediate_size: int
    num_experts: int
    num_experts_per_tok: int
    norm_topk_prob: bool = True
    activation: str = "silu"
    router_bias: bool = False  # GPT-OSS
    expert_bias: bool = False  # GPT-OSS: gate/up biases [E, F], down bias [E, D]
    swiglu_limit: float | None = None  # GPT-OSS: `clamped_swiglu(swiglu_alpha, swiglu_limit)`
    swiglu_alpha: float = 1.702
    router_type: str = "softmax"  # "sigmoid": Llama 4's `route_sigmoid`, the weight scaling the input
    shared_expert_size: int | None = None  # Llama 4: a gated MLP `shared_expert` every token goes through
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BTD, segment_ids_BT=None):
        b, t, d = x_BTD.shape
        e, f = self.num_experts, self.intermediate_size
        x_ND = x_BTD.reshape(b * t, d)
        # Routing decisions in float32, whatever the compute dtype: bf16 logits flip top-k ties.
        logits_NE = Dense((e,), ("embed",), (None,), use_bias=self.router_bias, name="router", dtype=jnp.float32,
                          param_dtype=self.param_dtype)(x_ND)
        if self.router_type == "sigmoid":
            weights_Nk, experts_Nk, probs_NE = route_sigmoid(logits_NE, self.num_experts_per_tok)
        else:
            weights_Nk, experts_Nk, probs_NE = route(logits_NE, self.num_experts_per_tok, self.norm_topk_prob)

        def expert_param(name, shape, axes):
            return self.param(name, param_with_axes(default_init, axes), shape, self.param_dtype).astype(self.dtype)

        w_gate_EDF = expert_param("gate_proj", (e, d, f), ("expert", "embed", "mlp"))
        w_up_EDF = expert_param("up_proj", (e, d, f), ("expert", "embed", "mlp"))
        w_down_EFD = expert_param("down_proj", (e, f, d), ("expert", "mlp", "embed"))
        biases = None
        if self.expert_bias:
            zeros = nn.initializers.zeros
            biases = tuple(self.param(name, param_with_axes(zeros, axes), shape, self.param_dtype).astype(self.dtype)
                           for name, shape, axes in (("gate_bias", (e, f), ("expert", "mlp")),
                                                     ("up_bias", (e, f), ("expert", "mlp")),
                                                     ("down_bias", (e, d), ("expert", "embed"))))
        if self.swiglu_limit is not None:
            glu = clamped_swiglu(self.swiglu_alpha, self.swiglu_limit)
        else:
            glu = lambda gate, up, act=ACTIVATIONS[self.activation]: act(gate) * up
        y_ND = dispatch_experts(x_ND.astype(self.dtype), experts_Nk, weights_Nk, w_gate_EDF, w_up_EDF, w_down_EFD,
                                glu, biases, scale_inputs=self.router_type == "sigmoid")
        if self.shared_expert_size is not None:
            shared = MLP(d, self.shared_expert_size, self.activation, gated=True, name="shared_expert",
                         dtype=self.dtype, param_dtype=self.param_dtype)
            y_ND = shared(x_BTD).reshape(b * t, d) + y_ND

        valid_N = (jnp.ones((b * t,), jnp.float32) if segment_ids_BT is None
                   else (segment_ids_BT.reshape(-1) > 0).astype(jnp.float32))
        lse_N = jax.nn.logsumexp(logits_NE, axis=-1)
        stats = {
            "expert_counts": jnp.zeros((e,), jnp.float32).at[experts_Nk].add(
                jnp.broadcast_to(valid_N[:, None], experts_Nk.shape)),
            "expert_probs": jnp.sum(probs_NE * valid_N[:, None], axis=0),
            "router_z": jnp.sum(jnp.square(lse_N) * valid_N),
            "tokens": jnp.sum(valid_N),
        }
        return y_ND.reshape(b, t, d), stats


class MoEDecoderBlock(DecoderBlock):
    """The pre-norm decoder block whose MLP is routed: it also sees the padding (segment
    ids, so router statistics skip padding) and returns its router statistics per layer."""

    @nn.compact
    def __call__(self, x_BTD, positions_BT, segment_ids_BT, layer=None):
        x_BTD = constrain(x_BTD, ("batch", "length", "activation_embed"))
        x_BTD = self.attention(x_BTD, positions_BT, segment_ids_BT, layer)
        mlp = self.make_mlp(name="mlp")
        x_BTD, stats = self.sublayer(x_BTD, lambda h: mlp(h, segment_ids_BT), "mlp")
        return constrain(x_BTD, ("batch", "length", "activation_embed")), stats


class Llama4Block(nn.Module):
    """`step` consecutive layers as one scanned step (Llama 4 Maverick routes every other layer):
    sub-blocks `layer_0` .. `layer_{step-1}`, the last routed (`MoEDecoderBlock`), the others
    dense (`DecoderBlock` with `make_dense_mlp`). Scanned block b holds layers b*step + p, which
    is the index the attention's kind switch gets. Returns the routed layer's statistics."""

    make_norm: Callable[[str], nn.Module]
    make_attention: Callable[[], nn.Module]
    make_mlp: Callable[[], nn.Module]
    make_dense_mlp: Callable[[], nn.Module]
    step: int
    norm_placement: str = "pre"

    @nn.compact
    def __call__(self, x_BTD, positions_BT, segment_ids_BT, block):
        stats = None
        for p in range(self.step):
            routed = p == self.step - 1
            cls = MoEDecoderBlock if routed else DecoderBlock
            x_BTD, out = cls(self.make_norm, self.make_attention, self.make_mlp if routed else self.make_dense_mlp,
                             self.norm_placement, name=f"layer_{p}")(x_BTD, positions_BT, segment_ids_BT,
                                                                     block * self.step + p)
            stats = out if routed else stats
        return x_BTD, stats


def aux_losses(stats_L: dict, num_experts: int) -> dict:
    """Load-balancing and router z losses from per-layer router statistics (leading L axis).

    load_balancing_loss is HF's `load_balancing_loss_func`: assignment counts and router
    probabilities are each pooled over every layer's tokens before their product, so it
    is E * sum_e (counts_e / R) * (probs_e / R) with R = layers * tokens (k when balanced).
    """
    rows = jnp.maximum(jnp.sum(stats_L["tokens"]), 1.0)
    counts_E = jnp.sum(stats_L["expert_counts"], axis=0) / rows
    probs_E = jnp.sum(stats_L["expert_probs"], axis=0) / rows
    return {"load_balancing_loss": num_experts * jnp.sum(counts_E * probs_E),
            "router_z_loss": jnp.sum(stats_L["router_z"]) / rows}


class MoEDecoder(Llama):
    """MixtralForCausalLM / Qwen3MoeForCausalLM / GptOssForCausalLM / Llama4ForCausalLM: `apply(params, input_ids,
    attention_mask=None, *, positions, segment_ids)` -> logits; with mutable=["aux_loss"] the auxiliary losses
    too. Llama 4's layers are scanned in blocks of `moe_layer_step` (`Llama4Block`): params under
    layers/layer_{p}/..., one leading axis of num_layers / moe_layer_step."""

    cfg: MoEConfig
    block_cls = MoEDecoderBlock

    def make_mlp(self, **kw) -> Callable[..., nn.Module]:
        """Routed experts in place of the dense MLP."""
        cfg = self.cfg
        return partial(MoEMLP, cfg.hidden_size, cfg.intermediate_size, cfg.num_experts, cfg.num_experts_per_tok,
                       cfg.norm_topk_prob, cfg.hidden_act, router_bias=cfg.router_bias,
                       expert_bias=cfg.expert_bias, swiglu_limit=cfg.swiglu_limit, swiglu_alpha=cfg.swiglu_alpha,
                       router_type=cfg.router_type, shared_expert_size=cfg.shared_expert_size, **kw)

    def make_blocks(self, kinds, kw, **block_kwargs):
        cfg = self.cfg
        if cfg.architecture != "Llama4ForCausalLM":
            return super().make_blocks(kinds, kw, **block_kwargs)
        step = cfg.moe_layer_step
        dense = partial(MLP, cfg.hidden_size, cfg.dense_intermediate_size or cfg.intermediate_size, cfg.hidden_act,
                        gated=True, **kw)
        return scan_layers(Llama4Block, cfg.num_layers // step, cfg.remat, per_layer_index=True,
                           make_dense_mlp=dense, step=step, **block_kwargs)

    def layer_outputs(self, outputs_L, segment_ids_BT) -> None:
        """Sows the auxiliary losses (a no-op unless "aux_loss" is mutable)."""
        del segment_ids_BT  # the statistics already skip padding
        for name, value in aux_losses(outputs_L, self.cfg.num_experts).items():
            self.sow(AUX_LOSS_COLLECTION, name, value)
