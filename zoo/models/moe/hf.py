"""Mixture-of-experts decoders (MixtralForCausalLM, Qwen3MoeForCausalLM) <-> zoo MoE: config
translation and weight table (zoo.hf.rules).

The moe family is the Llama decoder with routed MLPs (MoEConfig extends LlamaConfig,
MoEDecoder extends Llama), so attention, norms and RoPE are those of the dense class
named in `_DENSE_TWIN`: the config translation reuses the llama family's (its checks
included) and adds the MoE fields; the weight table reuses its decoder rules.
"""

from __future__ import annotations

import dataclasses

from zoo.hf.rules import ArchSpec, CheckpointError, Rule, get, require
from zoo.models.llama import hf as llama_hf
from zoo.models.llama.config import LlamaConfig
from zoo.models.moe.config import MoEConfig

_MODEL_TYPES = {"MixtralForCausalLM": "mixtral", "Qwen3MoeForCausalLM": "qwen3_moe"}
_DENSE_TWIN = {"MixtralForCausalLM": "MistralForCausalLM", "Qwen3MoeForCausalLM": "Qwen3ForCausalLM"}


def config_from_hf(hf: dict, name: str, arch: str) -> MoEConfig:
    is_qwen = arch == "Qwen3MoeForCausalLM"
    require(not hf.get("router_jitter_noise"), f"{arch}: router_jitter_noise is not supported")
    if is_qwen:
        require(get(hf, "decoder_sparse_step", 1) == 1 and not hf.get("mlp_only_layers"),
                f"{arch}: dense layers (decoder_sparse_step != 1 or mlp_only_layers) are not supported")
        require(not hf.get("shared_expert_intermediate_size"), f"{arch}: shared experts are not supported")
    # transformers>=5 writes Qwen3-MoE's expert count as num_local_experts; Qwen's releases say num_experts.
    experts = hf["num_experts"] if is_qwen and "num_experts" in hf else hf["num_local_experts"]
    ffn = hf["moe_intermediate_size"] if is_qwen else hf["intermediate_size"]
    twin = _DENSE_TWIN[arch]
    try:
        dense = llama_hf.config_from_hf({**hf, "intermediate_size": ffn}, name, twin)
    except CheckpointError as e:  # the checks are shared; the message names the class read
        raise CheckpointError(str(e).replace(twin, arch)) from None
    fields = {f.name: getattr(dense, f.name) for f in dataclasses.fields(dense)}
    return MoEConfig(**{**fields, "architecture": arch}, num_experts=experts,
                     num_experts_per_tok=hf["num_experts_per_tok"],
                     norm_topk_prob=bool(hf.get("norm_topk_prob", False)) if is_qwen else True,
                     router_aux_loss_coef=float(get(hf, "router_aux_loss_coef", 0.001)),
                     router_z_loss_coef=float(get(hf, "router_z_loss_coef", 0.001)))


def config_to_hf(cfg: MoEConfig) -> dict:
    arch = cfg.architecture
    is_qwen = arch == "Qwen3MoeForCausalLM"
    require(cfg.norm_topk_prob or is_qwen, f"{cfg.name}: {arch} always renormalises (needs norm_topk_prob=True)")
    require(cfg.rope_scaling is None, f"{cfg.name}: {arch} has no Llama-3 rope scaling")
    twin = _DENSE_TWIN[arch]
    dense = LlamaConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(LlamaConfig)} | {
        "architecture": twin})
    try:
        out = llama_hf.config_to_hf(dense)
    except CheckpointError as e:
        raise CheckpointError(str(e).replace(twin, arch)) from None
    out.update(architectures=[arch], model_type=_MODEL_TYPES[arch], num_experts_per_tok=cfg.num_experts_per_tok,
               router_aux_loss_coef=cfg.router_aux_loss_coef, router_z_loss_coef=cfg.router_z_loss_coef,
               output_router_logits=False)
    if is_qwen:
        out.update(num_experts=cfg.num_experts, moe_intermediate_size=cfg.intermediate_size,
                   norm_topk_prob=cfg.norm_topk_prob, decoder_sparse_step=1, mlp_only_layers=[])
    else:
        out.update(num_local_experts=cfg.num_experts, router_jitter_noise=0.0)
    return out


def weights(cfg: MoEConfig) -> list[Rule]:
    d, f, e = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts
    L, LE = (("i", cfg.num_layers),), (("i", cfg.num_layers), ("e", e))
    if cfg.architecture == "MixtralForCausalLM":  # w1 gate, w3 up, w2 down
        m = "model.layers.{i}.block_sparse_moe."
        names = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
    else:
        m = "model.layers.{i}.mlp."
        names = {p: p for p in ("gate_proj", "up_proj", "down_proj")}
    return llama_hf.decoder_weights(cfg, [
        Rule(m + "gate.weight", ("layers/mlp/router/kernel",), "linear", (e, d), L),
        *(Rule(m + f"experts.{{e}}.{names[p]}.weight", (f"layers/mlp/{p}",), "linear", shape, LE)
          for p, shape in (("gate_proj", (f, d)), ("up_proj", (f, d)), ("down_proj", (d, f)))),
    ])


ARCHITECTURES: dict[str, ArchSpec] = {arch: llama_hf.decoder_spec(arch, config_from_hf, config_to_hf, weights)
                                      for arch in MoEConfig.ARCHITECTURES}
