"""Mixture-of-experts decoders (MixtralForCausalLM, Qwen3MoeForCausalLM, GptOssForCausalLM, Llama4ForCausalLM) <->
zoo MoE: config translation and weight table (zoo.hf.rules).

The moe family is the Llama decoder with routed MLPs (MoEConfig extends LlamaConfig,
MoEDecoder extends Llama), so attention, norms and RoPE are those of the dense class
named in `_DENSE_TWIN`: the config translation reuses the llama family's (its checks
included) and adds the MoE fields; the weight table reuses its decoder rules.

GPT-OSS has no dense twin: its translation is its own. Its experts are stored per layer as
one tensor over all experts: gate_up_proj [E, D, 2F] with gate and up interleaved (even
columns gate) and input-major, down_proj [E, F, D], with biases. Released checkpoints store
both as MXFP4 (`*_blocks` / `*_scales`, `quantization_config.quant_method = "mxfp4"`): import
dequantises them tensor by tensor (zoo/hf/mxfp4.py); export writes them unquantised in the
param dtype (bf16 for a bf16 run) with no quantization_config, which transformers loads as is.

Llama 4 (text; Llama4ForCausalLM, model_type llama4_text) has its own translation too. Its RoPE
rotates interleaved pairs, so q_proj/k_proj rows are reordered per head at import (layout
"linear_rope_pairs", zoo/hf/rules.py) and back at export; its experts are one tensor per layer,
gate_up_proj [E, D, 2F] = [gate | up], input-major; layers are scanned in blocks of
interleave_moe_layer_step (zoo/models/moe/model.py Llama4Block), so HF layer b*step + p is block b's
`layer_{p}`. The FP8 (compressed-tensors) Maverick release is refused: import the bf16 one.
"""

from __future__ import annotations

import dataclasses

from zoo.hf.rules import (
    ArchSpec,
    CheckpointError,
    Rule,
    get,
    require,
    text_tower_config,
    text_tower_key,
    token_ids_from_hf,
)
from zoo.models.llama import hf as llama_hf
from zoo.models.llama.config import LlamaConfig
from zoo.models.moe.config import MoEConfig

_MODEL_TYPES = {"MixtralForCausalLM": "mixtral", "Qwen3MoeForCausalLM": "qwen3_moe", "GptOssForCausalLM": "gpt_oss",
                "Llama4ForCausalLM": "llama4_text"}
# Llama4TextConfig's values for keys config.json may leave out
_LLAMA4_DEFAULTS = dict(head_dim=128, intermediate_size=8192, intermediate_size_mlp=16384, num_local_experts=16,
                        num_experts_per_tok=1, interleave_moe_layer_step=1, max_position_embeddings=4096 * 32,
                        rms_norm_eps=1e-5, attention_chunk_size=8192, no_rope_layer_interval=4, floor_scale=8192,
                        attn_scale=0.1, use_qk_norm=True, attn_temperature_tuning=True, rope_theta=500000.0)
_DENSE_TWIN = {"MixtralForCausalLM": "MistralForCausalLM", "Qwen3MoeForCausalLM": "Qwen3ForCausalLM"}


def _gpt_oss_from_hf(hf: dict, name: str, arch: str) -> MoEConfig:
    quant = hf.get("quantization_config") or {}
    require(not quant or quant.get("quant_method") == "mxfp4",
            f"{arch}: quantization {quant.get('quant_method')!r} is not supported (only MXFP4 experts)")
    require(not hf.get("router_jitter_noise"), f"{arch}: router_jitter_noise is not supported")
    params = dict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling") or {}
    rope = legacy if legacy.get("rope_type", legacy.get("type")) == "yarn" else params
    kind = rope.get("rope_type", rope.get("type"))
    theta = float(params.get("rope_theta", hf.get("rope_theta", 150000.0)))
    if kind in (None, "default"):
        scaling = None
    else:
        require(kind == "yarn", f"{arch}: rope scaling type {kind!r} is not supported (only 'yarn' or none)")
        for key in ("attention_factor", "mscale", "mscale_all_dim"):
            require(not rope.get(key), f"{arch}: YaRN {key} is not supported")
        original = int(rope["original_max_position_embeddings"])
        scaling = ("yarn", float(rope.get("factor") or get(hf, "max_position_embeddings", 131072) / original),
                   float(rope.get("beta_fast") or 32.0), float(rope.get("beta_slow") or 1.0), original,
                   bool(rope.get("truncate", True)))
    n_layers = hf["num_hidden_layers"]
    types = tuple(hf.get("layer_types") or ("full_attention" if i % 2 else "sliding_attention"
                                              for i in range(n_layers)))
    bias = bool(hf.get("attention_bias", True))
    d, n = hf["hidden_size"], hf["num_attention_heads"]
    return MoEConfig(
        name=name, architecture=arch, vocab_size=hf["vocab_size"], hidden_size=d, num_layers=n_layers,
        num_heads=n, num_kv_heads=get(hf, "num_key_value_heads", n), head_dim=get(hf, "head_dim", d // n),
        intermediate_size=hf["intermediate_size"], max_seq_len=get(hf, "max_position_embeddings", 131072),
        rope_theta=theta, rope_scaling=scaling, rms_norm_eps=get(hf, "rms_norm_eps", 1e-5),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        sliding_window=get(hf, "sliding_window", 128) if "sliding_attention" in types else None,
        layer_types=types if "sliding_attention" in types else None,
        attention_bias=bias, attention_out_bias=bias, attention_sinks=True,
        num_experts=hf["num_local_experts"], num_experts_per_tok=hf["num_experts_per_tok"], norm_topk_prob=True,
        router_bias=True, expert_bias=True, swiglu_limit=float(get(hf, "swiglu_limit", 7.0)),
        swiglu_alpha=float(get(hf, "swiglu_alpha", 1.702)),
        router_aux_loss_coef=float(get(hf, "router_aux_loss_coef", 0.001)),
        router_z_loss_coef=float(get(hf, "router_z_loss_coef", 0.001)), **token_ids_from_hf(hf),
    )


def _llama4_from_hf(hf: dict, name: str, arch: str) -> MoEConfig:
    hf_get = lambda key: get(hf, key, _LLAMA4_DEFAULTS.get(key))
    quant = (hf.get("quantization_config") or {}).get("quant_method", "quantization_config")
    require(not hf.get("quantization_config"), f"{arch}: quantized checkpoints ({quant}) are not supported: import "
            "the bf16 release")
    require(not hf.get("attention_bias"), f"{arch}: attention_bias is not supported")
    require(get(hf, "hidden_act", "silu") in ("silu", "swish"), f"{arch}: hidden_act {hf.get('hidden_act')!r} is "
            "not supported (only silu)")
    require(not hf.get("router_jitter_noise"), f"{arch}: router_jitter_noise is not supported")
    n_layers, step = hf["num_hidden_layers"], hf_get("interleave_moe_layer_step")
    moe_layers = list(range(step - 1, n_layers, step))
    require(n_layers % step == 0 and list(hf.get("moe_layers") or moe_layers) == moe_layers,
            f"{arch}: moe_layers {hf.get('moe_layers')} is not every {step}-th layer of {n_layers} (from layer "
            f"{step - 1})")
    interval = hf_get("no_rope_layer_interval")
    uses_rope = list(hf.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(n_layers)])[:n_layers]
    chunk = hf.get("attention_chunk_size", _LLAMA4_DEFAULTS["attention_chunk_size"])  # null: no chunking
    layer_types = tuple(hf.get("layer_types") or ("chunked_attention" if uses_rope[i] and chunk else "full_attention"
                                                   for i in range(n_layers)))
    require(set(layer_types) <= {"chunked_attention", "full_attention"},
            f"{arch}: layer_types {sorted(set(layer_types))} is not supported")
    rope_theta, rope_scaling = llama_hf._rope_from_hf({**hf, "rope_theta": hf_get("rope_theta")}, arch)
    d, n = hf["hidden_size"], hf["num_attention_heads"]
    f = hf_get("intermediate_size")
    return MoEConfig(
        name=name, architecture=arch, vocab_size=hf["vocab_size"], hidden_size=d, num_layers=n_layers, num_heads=n,
        num_kv_heads=get(hf, "num_key_value_heads", n), head_dim=hf_get("head_dim"), intermediate_size=f,
        max_seq_len=hf_get("max_position_embeddings"), rope_theta=rope_theta, rope_scaling=rope_scaling,
        rms_norm_eps=hf_get("rms_norm_eps"), tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        nope_layers=tuple(i for i, r in enumerate(uses_rope) if not r),
        layer_types=layer_types if "chunked_attention" in layer_types else None,
        attention_chunk_size=chunk if "chunked_attention" in layer_types else None,
        qk_l2_norm=bool(hf_get("use_qk_norm")), attn_temperature_tuning=bool(hf_get("attn_temperature_tuning")),
        floor_scale=int(hf_get("floor_scale")), attn_scale=float(hf_get("attn_scale")),
        num_experts=hf_get("num_local_experts"), num_experts_per_tok=hf_get("num_experts_per_tok"),
        router_type="sigmoid", shared_expert_size=f, moe_layer_step=step,
        dense_intermediate_size=hf_get("intermediate_size_mlp") if step > 1 else None,
        router_aux_loss_coef=float(get(hf, "router_aux_loss_coef", 0.001)),
        router_z_loss_coef=float(get(hf, "router_z_loss_coef", 0.001)), **token_ids_from_hf(hf, (1, 2, None)),
    )


def _llama4_to_hf(cfg: MoEConfig) -> dict:
    arch = cfg.architecture
    expected = dict(router_type="sigmoid", shared_expert_size=cfg.intermediate_size, attention_bias=False,
                    attention_out_bias=False, attention_sinks=False, router_bias=False, expert_bias=False,
                    swiglu_limit=None, qk_norm=False, norm_placement="pre", norm_offset=False, embed_scale=False,
                    hidden_act="silu", sliding_window=None, attn_logit_softcap=None, final_logit_softcap=None,
                    query_pre_attn_scalar=None, rope_local_theta=None, partial_rotary_factor=1.0)
    for field, value in expected.items():
        require(getattr(cfg, field) == value, f"{cfg.name}: {arch} needs {field}={value}")
    require(cfg.rope_scaling is None or len(cfg.rope_scaling) == 4,
            f"{cfg.name}: {arch} exports Llama-3 rope scaling only, not {cfg.rope_scaling}")
    layer_types = list(cfg.layer_types or ["full_attention"] * cfg.num_layers)
    rope = llama_hf._rope_to_hf(cfg)
    return {
        **llama_hf.shape_to_hf(cfg, _MODEL_TYPES[arch]), "hidden_act": "silu", **rope,
        "intermediate_size_mlp": cfg.dense_intermediate_size or 16384, "num_local_experts": cfg.num_experts,
        "num_experts_per_tok": cfg.num_experts_per_tok, "interleave_moe_layer_step": cfg.moe_layer_step,
        "moe_layers": list(cfg.moe_layers), "use_qk_norm": cfg.qk_l2_norm,
        "no_rope_layers": [int(i not in cfg.nope_layers) for i in range(cfg.num_layers)], "no_rope_layer_interval": 4,
        "attention_chunk_size": cfg.attention_chunk_size, "layer_types": layer_types,
        "attn_temperature_tuning": cfg.attn_temperature_tuning, "floor_scale": cfg.floor_scale,
        "attn_scale": cfg.attn_scale, "attention_bias": False, "router_aux_loss_coef": cfg.router_aux_loss_coef,
        "router_z_loss_coef": cfg.router_z_loss_coef, "router_jitter_noise": 0.0, "output_router_logits": False,
    }


def _gpt_oss_to_hf(cfg: MoEConfig) -> dict:
    arch = cfg.architecture
    expected = dict(attention_out_bias=cfg.attention_bias, attention_sinks=True, norm_topk_prob=True,
                    router_bias=True, expert_bias=True, qk_norm=False, norm_placement="pre", norm_offset=False,
                    embed_scale=False, nope_layers=(), hidden_act="silu", attn_logit_softcap=None,
                    final_logit_softcap=None, query_pre_attn_scalar=None, rope_local_theta=None,
                    attention_chunk_size=None, qk_l2_norm=False, attn_temperature_tuning=False)
    for field, value in expected.items():
        require(getattr(cfg, field) == value, f"{cfg.name}: {arch} needs {field}={value}")
    require(cfg.swiglu_limit is not None, f"{cfg.name}: {arch} needs swiglu_limit (its clamped SwiGLU)")
    require(cfg.rope_scaling is None or cfg.rope_scaling[0] == "yarn",
            f"{cfg.name}: {arch} exports YaRN rope scaling only, not {cfg.rope_scaling}")
    layer_types = list(cfg.layer_types or (["sliding_attention"] * cfg.num_layers if cfg.sliding_window
                                           else ["full_attention"] * cfg.num_layers))
    rope: dict = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        _, factor, fast, slow, original, truncate = cfg.rope_scaling
        rope = {"rope_type": "yarn", "rope_theta": cfg.rope_theta, "factor": factor, "beta_fast": fast,
                "beta_slow": slow, "original_max_position_embeddings": original, "truncate": truncate}
    return {
        **llama_hf.shape_to_hf(cfg, _MODEL_TYPES[arch]), "hidden_act": "silu",
        "attention_bias": cfg.attention_bias, "sliding_window": cfg.sliding_window or 128,
        "layer_types": layer_types, "rope_parameters": rope, "rope_theta": cfg.rope_theta,
        "rope_scaling": {k: v for k, v in rope.items() if k != "rope_theta"} if cfg.rope_scaling else None,
        "num_local_experts": cfg.num_experts, "num_experts_per_tok": cfg.num_experts_per_tok,
        "swiglu_limit": cfg.swiglu_limit, "swiglu_alpha": cfg.swiglu_alpha,
        "router_aux_loss_coef": cfg.router_aux_loss_coef, "router_z_loss_coef": cfg.router_z_loss_coef,
        "output_router_logits": False,
    }


def config_from_hf(hf: dict, name: str, arch: str) -> MoEConfig:
    if arch == "GptOssForCausalLM":
        return _gpt_oss_from_hf(hf, name, arch)
    if arch == "Llama4ForCausalLM":
        return _llama4_from_hf(hf, name, arch)
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
    require(cfg.router_type == "softmax" and cfg.shared_expert_size is None or arch == "Llama4ForCausalLM",
            f"{cfg.name}: sigmoid routing and a shared expert are only exported as Llama4ForCausalLM")
    if arch == "GptOssForCausalLM":
        return _gpt_oss_to_hf(cfg)
    if arch == "Llama4ForCausalLM":
        return _llama4_to_hf(cfg)
    require(not (cfg.router_bias or cfg.expert_bias or cfg.attention_sinks or cfg.attention_out_bias) and
            cfg.swiglu_limit is None, f"{cfg.name}: router/expert biases, sinks, o_proj bias and the clamped "
            "SwiGLU are only exported as GptOssForCausalLM")
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


def _llama4_weights(cfg: MoEConfig) -> list[Rule]:
    """Every HF layer b*step + p is block b's `layer_{p}`; the last of each block is routed."""
    d, v, f, e = cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size, cfg.num_experts
    n, k, h, step = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.moe_layer_step
    rules = [Rule("model.embed_tokens.weight", ("embed_tokens/embedding",), "copy", (v, d)),
             Rule("model.norm.weight", ("norm/scale",), "copy", (d,))]
    for p in range(step):
        S, z, a = (("i", cfg.num_layers // step, p, step),), f"layers/layer_{p}/", "model.layers.{i}.self_attn."
        m = "model.layers.{i}.feed_forward."
        rules += [
            Rule("model.layers.{i}.input_layernorm.weight", (z + "attn_norm/scale",), "copy", (d,), S),
            Rule("model.layers.{i}.post_attention_layernorm.weight", (z + "mlp_norm/scale",), "copy", (d,), S),
            Rule(a + "q_proj.weight", (z + "attn/q_proj/kernel",), "linear_rope_pairs", (n * h, d), S),
            Rule(a + "k_proj.weight", (z + "attn/k_proj/kernel",), "linear_rope_pairs", (k * h, d), S),
            Rule(a + "v_proj.weight", (z + "attn/v_proj/kernel",), "linear", (k * h, d), S),
            Rule(a + "o_proj.weight", (z + "attn/o_proj/kernel",), "linear", (d, n * h), S),
        ]
        if p == step - 1:  # routed
            rules += [
                Rule(m + "router.weight", (z + "mlp/router/kernel",), "linear", (e, d), S),
                Rule(m + "experts.gate_up_proj", (z + "mlp/gate_proj", z + "mlp/up_proj"), "fused", (e, d, 2 * f), S),
                Rule(m + "experts.down_proj", (z + "mlp/down_proj",), "copy", (e, f, d), S),
                *(Rule(m + f"shared_expert.{x}_proj.weight", (z + f"mlp/shared_expert/{x}_proj/kernel",), "linear",
                       shape, S) for x, shape in (("gate", (f, d)), ("up", (f, d)), ("down", (d, f)))),
            ]
        else:
            g = cfg.dense_intermediate_size
            rules += [Rule(m + f"{x}_proj.weight", (z + f"mlp/{x}_proj/kernel",), "linear", shape, S)
                      for x, shape in (("gate", (g, d)), ("up", (g, d)), ("down", (d, g)))]
    if not cfg.tie_word_embeddings:
        rules.append(Rule("lm_head.weight", ("lm_head/kernel",), "linear", (v, d)))
    return rules


def weights(cfg: MoEConfig) -> list[Rule]:
    d, f, e = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts
    L, LE = (("i", cfg.num_layers),), (("i", cfg.num_layers), ("e", e))
    if cfg.architecture == "Llama4ForCausalLM":
        return _llama4_weights(cfg)
    if cfg.architecture == "GptOssForCausalLM":  # experts stored together; gate/up interleaved
        m, a = "model.layers.{i}.mlp.", "model.layers.{i}.self_attn."
        return llama_hf.decoder_weights(cfg, [
            Rule(m + "router.weight", ("layers/mlp/router/kernel",), "linear", (e, d), L),
            Rule(m + "router.bias", ("layers/mlp/router/bias",), "copy", (e,), L),
            Rule(m + "experts.gate_up_proj", ("layers/mlp/gate_proj", "layers/mlp/up_proj"), "interleaved",
                 (e, d, 2 * f), L),
            Rule(m + "experts.gate_up_proj_bias", ("layers/mlp/gate_bias", "layers/mlp/up_bias"), "interleaved",
                 (e, 2 * f), L),
            Rule(m + "experts.down_proj", ("layers/mlp/down_proj",), "copy", (e, f, d), L),
            Rule(m + "experts.down_proj_bias", ("layers/mlp/down_bias",), "copy", (e, d), L),
            Rule(a + "sinks", ("layers/attn/sinks",), "copy", (cfg.num_heads,), L),
            *([Rule(a + "o_proj.bias", ("layers/attn/o_proj/bias",), "copy", (d,), L)] if cfg.attention_out_bias
              else []),
        ])
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
ARCHITECTURES["GptOssForCausalLM"] = dataclasses.replace(ARCHITECTURES["GptOssForCausalLM"], mxfp4=True)


# Import-only: the hub's Llama 4 releases are Llama4ForConditionalGeneration; their text tower
# (language_model.*) loads as Llama4ForCausalLM, the vision model and projector are left out.
IMPORTS: dict[str, ArchSpec] = {
    "Llama4ForConditionalGeneration": dataclasses.replace(
        ARCHITECTURES["Llama4ForCausalLM"],
        config_from_hf=lambda hf, name: _llama4_from_hf(text_tower_config(hf, "Llama4ForConditionalGeneration"),
                                                        name, "Llama4ForCausalLM"),
        ignore=(r"^(model\.)?vision_model\.", r"^(model\.)?multi_modal_projector\."), normalize_key=text_tower_key),
}
