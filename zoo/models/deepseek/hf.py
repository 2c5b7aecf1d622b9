"""DeepseekV3ForCausalLM / DeepseekV2ForCausalLM <-> zoo DeepSeek: config translation and weight
table (zoo.hf.rules).

Attention: q_b_proj (or V2-Lite's q_proj) holds per head [q_nope | q_rope] rows, kv_a_proj_with_mqa
[latent | k_rope], kv_b_proj per head [k_nope | v]: each becomes separate zoo kernels ("linear_split"),
and the RoPE rows (V3's interleaved pairs, V2's complex ones: the same order) are reordered
even-then-odd for the zoo's half-split RoPE ("linear_split_rope_pairs"); export undoes both.
Experts are stored one by one (`mlp.experts.{e}.*`), V3's router carries the float32
`e_score_correction_bias`. Multi-token-prediction depths are layers L + j (DeepSeek-V3's layer 61):
enorm, hnorm, eh_proj, a MoE decoder layer, shared_head.norm, and copies of the embedding and the
LM head (shared_head.head), checked equal on import and written again on export. config.json's
num_nextn_predict_layers says 1 whether or not they were saved (transformers never saves them),
so the tensors decide num_mtp_layers. Block-FP8 releases are refused: import a bf16 copy.
"""

from __future__ import annotations

import dataclasses

from zoo.hf.rules import ArchSpec, Rule, get, require, token_ids_from_hf, token_ids_to_hf
from zoo.models.deepseek.config import DeepSeekConfig

_MODEL_TYPES = {"DeepseekV3ForCausalLM": "deepseek_v3", "DeepseekV2ForCausalLM": "deepseek_v2"}
# transformers' class defaults for keys config.json may leave out (V3, V2)
_DEFAULTS = {
    "DeepseekV3ForCausalLM": dict(q_lora_rank=1536, n_group=8, topk_group=4, first_k_dense_replace=3,
                                  norm_topk_prob=True, routed_scaling_factor=2.5, topk_method="noaux_tc",
                                  n_shared_experts=1, max_position_embeddings=4096, tokens=(0, 1, None)),
    "DeepseekV2ForCausalLM": dict(q_lora_rank=1536, n_group=1, topk_group=1, first_k_dense_replace=0,
                                  norm_topk_prob=False, routed_scaling_factor=1.0, topk_method="greedy",
                                  n_shared_experts=2, max_position_embeddings=2048, tokens=(1, 2, None)),
}


def _rope_from_hf(hf: dict, arch: str) -> dict:
    params = dict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope = params if params.get("rope_type", params.get("type")) not in (None, "default") else legacy
    kind = rope.get("rope_type", rope.get("type")) if rope else None
    if kind in (None, "default"):
        return dict(rope_theta=theta, rope_scaling=None)
    require(kind == "yarn", f"{arch}: rope scaling type {kind!r} is not supported (only 'yarn' or none)")
    require(not rope.get("attention_factor"), f"{arch}: YaRN attention_factor is not supported")
    original = int(rope["original_max_position_embeddings"])
    factor = float(rope.get("factor") or get(hf, "max_position_embeddings", 4096) / original)
    return dict(rope_theta=theta, rope_scaling=("yarn", factor, float(rope.get("beta_fast") or 32.0),
                                                float(rope.get("beta_slow") or 1.0), original,
                                                bool(rope.get("truncate", True))),
                yarn_mscale=rope.get("mscale"), yarn_mscale_all_dim=rope.get("mscale_all_dim"))


def config_from_hf(hf: dict, name: str, arch: str) -> DeepSeekConfig:
    v3, dflt = arch == "DeepseekV3ForCausalLM", _DEFAULTS[arch]
    quant = (hf.get("quantization_config") or {}).get("quant_method", "quantization_config")
    require(not hf.get("quantization_config"), f"{arch}: quantized checkpoints ({quant}) are not supported: import "
            "a bf16 copy")
    require(not hf.get("attention_bias") and not hf.get("mlp_bias"), f"{arch}: attention_bias / mlp_bias are not "
            "supported")
    require(get(hf, "hidden_act", "silu") in ("silu", "swish"), f"{arch}: hidden_act {hf.get('hidden_act')!r} is "
            "not supported (only silu)")
    require(get(hf, "moe_layer_freq", 1) == 1, f"{arch}: moe_layer_freq {hf.get('moe_layer_freq')} is not supported")
    n = hf["num_attention_heads"]
    require(get(hf, "num_key_value_heads", n) == n, f"{arch}: num_key_value_heads must equal num_attention_heads")
    method = get(hf, "topk_method", dflt["topk_method"])
    scoring = get(hf, "scoring_func", "sigmoid" if v3 else "softmax")
    require((method, scoring) == ("noaux_tc", "sigmoid") if v3 else
            (method in ("greedy", "group_limited_greedy") and scoring == "softmax"),
            f"{arch}: routing topk_method={method!r} scoring_func={scoring!r} is not supported")
    require(v3 or not hf.get("norm_topk_prob"), f"{arch}: norm_topk_prob=True (transformers ignores it) is not "
            "supported")
    require(not v3 or get(hf, "rope_interleave", True), f"{arch}: rope_interleave=False is not supported")
    return DeepSeekConfig(
        name=name, architecture=arch, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"], num_heads=n, intermediate_size=hf["intermediate_size"],
        max_seq_len=get(hf, "max_position_embeddings", dflt["max_position_embeddings"]),
        q_lora_rank=hf["q_lora_rank"] if "q_lora_rank" in hf else dflt["q_lora_rank"],
        kv_lora_rank=hf["kv_lora_rank"], qk_nope_head_dim=hf["qk_nope_head_dim"],
        qk_rope_head_dim=hf["qk_rope_head_dim"], v_head_dim=hf["v_head_dim"], **_rope_from_hf(hf, arch),
        rms_norm_eps=get(hf, "rms_norm_eps", 1e-6), tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        first_k_dense_replace=get(hf, "first_k_dense_replace", dflt["first_k_dense_replace"]),
        moe_intermediate_size=hf["moe_intermediate_size"], num_experts=hf["n_routed_experts"],
        num_experts_per_tok=hf["num_experts_per_tok"], n_shared_experts=get(hf, "n_shared_experts",
                                                                            dflt["n_shared_experts"]),
        topk_method=method, n_group=get(hf, "n_group", dflt["n_group"]) if method != "greedy" else 1,
        topk_group=get(hf, "topk_group", dflt["topk_group"]) if method != "greedy" else 1,
        norm_topk_prob=bool(get(hf, "norm_topk_prob", dflt["norm_topk_prob"])),
        routed_scaling_factor=float(get(hf, "routed_scaling_factor", dflt["routed_scaling_factor"])),
        router_aux_loss_coef=float(get(hf, "aux_loss_alpha", 0.001)),
        router_z_loss_coef=float(get(hf, "router_z_loss_coef", 0.0)),
        bias_update_rate=float(get(hf, "bias_update_rate", 0.001)),
        mtp_loss_weight=float(get(hf, "mtp_loss_weight", 0.3)),
        **token_ids_from_hf(hf, dflt["tokens"]),
    )


def config_to_hf(cfg: DeepSeekConfig) -> dict:
    arch, v3 = cfg.architecture, cfg.architecture == "DeepseekV3ForCausalLM"
    require(cfg.topk_method == "noaux_tc" if v3 else cfg.topk_method != "noaux_tc",
            f"{cfg.name}: {arch} routes with {'noaux_tc' if v3 else 'greedy or group_limited_greedy'}")
    require(v3 or not cfg.norm_topk_prob, f"{cfg.name}: {arch} never renormalises (norm_topk_prob=False)")
    rope: dict = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        _, factor, fast, slow, original, truncate = cfg.rope_scaling
        rope = {"rope_type": "yarn", "rope_theta": cfg.rope_theta, "factor": factor, "beta_fast": fast,
                "beta_slow": slow, "original_max_position_embeddings": original, "truncate": truncate,
                "mscale": cfg.yarn_mscale, "mscale_all_dim": cfg.yarn_mscale_all_dim}
    out = {
        "architectures": [arch], "model_type": _MODEL_TYPES[arch], "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "moe_intermediate_size": cfg.moe_intermediate_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_heads,
        "n_shared_experts": cfg.n_shared_experts, "n_routed_experts": cfg.num_experts,
        "num_experts_per_tok": cfg.num_experts_per_tok, "routed_scaling_factor": cfg.routed_scaling_factor,
        "kv_lora_rank": cfg.kv_lora_rank, "q_lora_rank": cfg.q_lora_rank, "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "qk_nope_head_dim": cfg.qk_nope_head_dim, "v_head_dim": cfg.v_head_dim, "n_group": cfg.n_group,
        "topk_group": cfg.topk_group, "topk_method": cfg.topk_method, "first_k_dense_replace":
        cfg.first_k_dense_replace, "norm_topk_prob": cfg.norm_topk_prob, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings, "attention_bias": False, "rope_parameters": rope,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": {k: v for k, v in rope.items() if k != "rope_theta"} if cfg.rope_scaling else None,
        "aux_loss_alpha": cfg.router_aux_loss_coef, "router_z_loss_coef": cfg.router_z_loss_coef,
        "bias_update_rate": cfg.bias_update_rate, "mtp_loss_weight": cfg.mtp_loss_weight,  # zoo-only keys
        **token_ids_to_hf(cfg),
    }
    if v3:
        out.update(rope_interleave=True, scoring_func="sigmoid", num_nextn_predict_layers=cfg.num_mtp_layers,
                   moe_layer_freq=1)
    else:
        out.update(scoring_func="softmax", mlp_bias=False)
    return out


def _layer_rules(cfg: DeepSeekConfig, zoo: str, stack: tuple, moe: bool, layer: str = "model.layers.{i}.") -> \
        list[Rule]:
    d, n, r = cfg.hidden_size, cfg.num_heads, cfg.kv_lora_rank
    dn, dr, dv, q = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.q_lora_rank
    a, m = layer + "self_attn.", layer + "mlp."
    rules = [
        Rule(layer + "input_layernorm.weight", (zoo + "attn_norm/scale",), "copy", (d,), stack),
        Rule(layer + "post_attention_layernorm.weight", (zoo + "mlp_norm/scale",), "copy", (d,), stack),
        Rule(a + "kv_a_proj_with_mqa.weight", (zoo + "attn/kv_a_proj/kernel", zoo + "attn/k_rope_proj/kernel"),
             "linear_split_rope_pairs", (r + dr, d), stack),
        Rule(a + "kv_a_layernorm.weight", (zoo + "attn/kv_a_norm/scale",), "copy", (r,), stack),
        Rule(a + "kv_b_proj.weight", (zoo + "attn/k_nope_proj/kernel", zoo + "attn/v_proj/kernel"), "linear_split",
             (n * (dn + dv), r), stack),
        Rule(a + "o_proj.weight", (zoo + "attn/o_proj/kernel",), "linear", (d, n * dv), stack),
    ]
    q_parts = (zoo + "attn/q_nope_proj/kernel", zoo + "attn/q_rope_proj/kernel")
    if q:
        rules += [Rule(a + "q_a_proj.weight", (zoo + "attn/q_a_proj/kernel",), "linear", (q, d), stack),
                  Rule(a + "q_a_layernorm.weight", (zoo + "attn/q_a_norm/scale",), "copy", (q,), stack),
                  Rule(a + "q_b_proj.weight", q_parts, "linear_split_rope_pairs", (n * (dn + dr), q), stack)]
    else:
        rules.append(Rule(a + "q_proj.weight", q_parts, "linear_split_rope_pairs", (n * (dn + dr), d), stack))
    if not moe:
        f = cfg.intermediate_size
        return rules + [Rule(m + f"{x}_proj.weight", (zoo + f"mlp/{x}_proj/kernel",), "linear", shape, stack)
                        for x, shape in (("gate", (f, d)), ("up", (f, d)), ("down", (d, f)))]
    e, f, s = cfg.num_experts, cfg.moe_intermediate_size, cfg.n_shared_experts * cfg.moe_intermediate_size
    stack_e = stack + (("e", e),)
    rules += [Rule(m + "gate.weight", (zoo + "mlp/router/kernel",), "linear", (e, d), stack),
              *(Rule(m + f"experts.{{e}}.{x}_proj.weight", (zoo + f"mlp/{x}_proj",), "linear", shape, stack_e)
                for x, shape in (("gate", (f, d)), ("up", (f, d)), ("down", (d, f)))),
              *(Rule(m + f"shared_experts.{x}_proj.weight", (zoo + f"mlp/shared_experts/{x}_proj/kernel",), "linear",
                     shape, stack) for x, shape in (("gate", (s, d)), ("up", (s, d)), ("down", (d, s))))]
    if cfg.topk_method == "noaux_tc":
        rules.append(Rule(m + "gate.e_score_correction_bias", (zoo + "mlp/correction_bias",), "copy", (e,), stack))
    return rules


def weights(cfg: DeepSeekConfig) -> list[Rule]:
    d, v, k = cfg.hidden_size, cfg.vocab_size, cfg.first_k_dense_replace
    rules = [Rule("model.embed_tokens.weight", ("embed_tokens/embedding",), "copy", (v, d)),
             Rule("model.norm.weight", ("norm/scale",), "copy", (d,))]
    if k:
        rules += _layer_rules(cfg, "dense_layers/", (("i", k),), moe=False)
    rules += _layer_rules(cfg, "layers/", (("i", cfg.moe_layers, k),), moe=True)
    if not cfg.tie_word_embeddings:
        rules.append(Rule("lm_head.weight", ("lm_head/kernel",), "linear", (v, d)))
    for j in range(cfg.num_mtp_layers):
        hf, zoo = f"model.layers.{cfg.num_layers + j}.", f"mtp_{j}/"
        rules += [Rule(hf + "enorm.weight", (zoo + "enorm/scale",), "copy", (d,)),
                  Rule(hf + "hnorm.weight", (zoo + "hnorm/scale",), "copy", (d,)),
                  Rule(hf + "eh_proj.weight", (zoo + "eh_proj/kernel",), "linear", (d, 2 * d)),
                  Rule(hf + "shared_head.norm.weight", (zoo + "head_norm/scale",), "copy", (d,)),
                  *_layer_rules(cfg, zoo + "block/", (), moe=True, layer=hf)]
    return rules


def _mtp_depths(cfg: DeepSeekConfig, keys: frozenset) -> DeepSeekConfig:
    """num_mtp_layers = the depths whose eh_proj the checkpoint holds (layers L, L+1, ...)."""
    depth = 0
    while f"model.layers.{cfg.num_layers + depth}.eh_proj.weight" in keys:
        depth += 1
    return dataclasses.replace(cfg, num_mtp_layers=depth) if depth != cfg.num_mtp_layers else cfg


def _mtp_copies(cfg: DeepSeekConfig) -> dict[str, str]:
    """Each MTP depth stores the embedding and the LM head again."""
    head = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    out = {}
    for j in range(cfg.num_mtp_layers):
        layer = f"model.layers.{cfg.num_layers + j}."
        out[layer + "embed_tokens.weight"] = "model.embed_tokens.weight"
        out[layer + "shared_head.head.weight"] = head
    return out


ARCHITECTURES: dict[str, ArchSpec] = {
    arch: ArchSpec(config_from_hf=lambda hf, name, arch=arch: config_from_hf(hf, name, arch),
                   config_to_hf=config_to_hf, weights=weights, fit_to_tensors=_mtp_depths, copies=_mtp_copies,
                   ignore=(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$",),
                   tied=lambda cfg: {"lm_head.weight": "model.embed_tokens.weight"} if cfg.tie_word_embeddings
                   else {})
    for arch in DeepSeekConfig.ARCHITECTURES}
