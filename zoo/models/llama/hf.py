"""Llama-style *ForCausalLM classes (Llama, Mistral, Qwen2, Qwen3, Gemma) <-> zoo Llama:
config translation and weight table (zoo.hf.rules). The moe family builds on both."""

from __future__ import annotations

import math
from typing import Any

from zoo.hf.rules import ArchSpec, Rule, get, require, token_ids_from_hf, token_ids_to_hf
from zoo.models.llama.config import LlamaConfig

MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
               "Qwen3ForCausalLM": "qwen3", "GemmaForCausalLM": "gemma", "Olmo2ForCausalLM": "olmo2",
               "SmolLM3ForCausalLM": "smollm3", "Phi3ForCausalLM": "phi3"}
# What transformers' config classes fall back to when config.json leaves out bos/eos/pad (others: None).
_TOKEN_DEFAULTS = {"LlamaForCausalLM": (1, 2, None), "MistralForCausalLM": (1, 2, None),
                   "GemmaForCausalLM": (2, 1, 0), "Olmo2ForCausalLM": (None, 50279, 1),
                   "SmolLM3ForCausalLM": (128000, 128001, 128004), "Phi3ForCausalLM": (1, 32000, 32000)}
_ACTIVATIONS_FROM_HF = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
_ACTIVATIONS_TO_HF = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh"}


def _rope_from_hf(hf: dict, arch: str) -> tuple[float, tuple | None]:
    """(rope_theta, Llama-3 scaling tuple or None) from either the transformers>=5
    `rope_parameters` dict or the older top-level rope_theta/rope_scaling fields."""
    params = dict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = params if params.get("rope_type", params.get("type")) not in (None, "default") else legacy
    kind = scaling.get("rope_type", scaling.get("type")) if scaling else None
    if kind in (None, "default"):
        return float(theta), None
    if arch == "Phi3ForCausalLM" and kind in ("longrope", "su"):  # LongRoPE (Phi-3 128k, Phi-3.5, Phi-4-mini)
        original = int(scaling.get("original_max_position_embeddings") or get(hf, "original_max_position_embeddings",
                                                                                  4096))
        factor = scaling.get("factor") or get(hf, "max_position_embeddings", 4096) / original
        attention = scaling.get("attention_factor")
        if attention is None:
            attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        return float(theta), ("longrope", tuple(scaling["short_factor"]), tuple(scaling["long_factor"]), original,
                              float(attention))
    require(kind == "llama3", f"{arch}: rope scaling type {kind!r} is not supported (only 'llama3' or none)")
    return float(theta), (float(scaling["factor"]), float(scaling["low_freq_factor"]),
                          float(scaling["high_freq_factor"]), int(scaling["original_max_position_embeddings"]))


def _rope_to_hf(cfg: LlamaConfig) -> dict:
    """Both spellings: transformers>=5 reads `rope_parameters`, older versions the rest."""
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.partial_rotary_factor != 1.0:
        params["partial_rotary_factor"] = cfg.partial_rotary_factor
    legacy = None
    if cfg.rope_scaling is not None and cfg.rope_scaling[0] == "longrope":
        _, short, long, original, attention = cfg.rope_scaling
        legacy = {"rope_type": "longrope", "short_factor": list(short), "long_factor": list(long),
                  "original_max_position_embeddings": original, "attention_factor": attention}
        params.update(legacy)
    elif cfg.rope_scaling is not None:
        factor, low, high, original = cfg.rope_scaling
        legacy = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                  "original_max_position_embeddings": original}
        params.update(legacy)
    return {"rope_parameters": params, "rope_theta": cfg.rope_theta, "rope_scaling": legacy}


def config_from_hf(hf: dict, name: str, arch: str) -> LlamaConfig:
    is_gemma = arch == "GemmaForCausalLM"
    act = hf.get("hidden_activation") or hf.get("hidden_act") or ("gelu_pytorch_tanh" if is_gemma else "silu")
    if is_gemma and act == "gelu":
        act = "gelu_pytorch_tanh"  # Gemma's released configs say "gelu" but mean the tanh form (as transformers)
    require(act in _ACTIVATIONS_FROM_HF,
            f"{arch}: hidden_act {act!r} is not supported (supported: {', '.join(_ACTIVATIONS_FROM_HF)})")
    require(not hf.get("mlp_bias", False), f"{arch}: mlp_bias is not supported")
    attention_bias = arch == "Qwen2ForCausalLM"
    require(bool(hf.get("attention_bias", attention_bias)) == attention_bias,
            f"{arch}: attention_bias={hf.get('attention_bias')} is not supported for this architecture")
    smol, olmo = arch == "SmolLM3ForCausalLM", arch == "Olmo2ForCausalLM"
    require(not hf.get("use_sliding_window", False) or arch in ("MistralForCausalLM", "SmolLM3ForCausalLM"),
            f"{arch}: use_sliding_window (per-layer windows) is not supported")
    layer_types = tuple(hf.get("layer_types") or ())
    require(set(layer_types) <= {"full_attention"} or smol, f"{arch}: layer_types {sorted(set(layer_types))} is not "
            "supported")
    phi3 = arch == "Phi3ForCausalLM"
    window = hf.get("sliding_window") if arch in ("MistralForCausalLM", "Phi3ForCausalLM") or \
        "sliding_attention" in layer_types else None
    partial = float((hf.get("rope_parameters") or {}).get("partial_rotary_factor",
                                                          hf.get("partial_rotary_factor", 1.0)))
    require(phi3 or partial == 1.0, f"{arch}: partial_rotary_factor {partial} is not supported")
    nope = ()
    require(not hf.get("use_bidirectional_attention"), f"{arch}: use_bidirectional_attention is not supported")
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        require(hf.get(key) is None, f"{arch}: {key} is not supported")
    rope_theta, rope_scaling = _rope_from_hf(hf, arch)
    d, n = hf["hidden_size"], hf["num_attention_heads"]
    if smol:  # no_rope_layers[i] is 1 where layer i HAS RoPE (HF's naming); default: every 4th layer has none
        interval = get(hf, "no_rope_layer_interval", 4)
        uses_rope = hf.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(hf["num_hidden_layers"])]
        nope = tuple(i for i, r in enumerate(uses_rope) if not r)
    return LlamaConfig(
        name=name, architecture=arch, vocab_size=hf["vocab_size"], hidden_size=d,
        num_layers=hf["num_hidden_layers"], num_heads=n, num_kv_heads=get(hf, "num_key_value_heads", n),
        head_dim=get(hf, "head_dim", d // n), intermediate_size=hf["intermediate_size"],
        max_seq_len=get(hf, "max_position_embeddings", 2048), rope_theta=rope_theta, rope_scaling=rope_scaling,
        rms_norm_eps=get(hf, "rms_norm_eps", 1e-6), tie_word_embeddings=bool(hf.get("tie_word_embeddings", is_gemma)),
        sliding_window=window, layer_types=layer_types if "sliding_attention" in layer_types else None,
        nope_layers=nope, attention_bias=attention_bias, partial_rotary_factor=partial,
        qk_norm=arch in ("Qwen3ForCausalLM", "Olmo2ForCausalLM"),
        qk_norm_flat=olmo, norm_placement="post" if olmo else "pre", norm_offset=is_gemma,
        embed_scale=is_gemma, hidden_act=_ACTIVATIONS_FROM_HF[act],
        **token_ids_from_hf(hf, _TOKEN_DEFAULTS.get(arch, (None, None, None))),
    )


def shape_to_hf(cfg: LlamaConfig, model_type: str) -> dict:
    """The config.json fields every Llama-style decoder class shares: sizes, norms, tokens."""
    return {
        "architectures": [cfg.architecture], "model_type": model_type,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings, **token_ids_to_hf(cfg),
    }


def config_to_hf(cfg: LlamaConfig) -> dict:
    arch = cfg.architecture
    # The switches are fixed per HF class; a combination no HF class implements cannot be exported.
    olmo, smol = arch == "Olmo2ForCausalLM", arch == "SmolLM3ForCausalLM"
    expected = dict(attention_bias=arch == "Qwen2ForCausalLM", qk_norm=arch in ("Qwen3ForCausalLM", "Olmo2ForCausalLM"),
                    qk_norm_flat=olmo, norm_placement="post" if olmo else "pre",
                    norm_offset=arch == "GemmaForCausalLM", embed_scale=arch == "GemmaForCausalLM",
                    attn_logit_softcap=None, final_logit_softcap=None, query_pre_attn_scalar=None,
                    rope_local_theta=None)
    for field, value in expected.items():
        require(getattr(cfg, field) == value, f"{cfg.name}: {arch} needs {field}={value}")
    require(not (cfg.attention_chunk_size or cfg.qk_l2_norm or cfg.attn_temperature_tuning),
            f"{cfg.name}: chunked attention, the QK L2 norm and attention temperature are only exported as "
            "Llama4ForCausalLM")
    require(cfg.sliding_window is None or arch in ("MistralForCausalLM", "Phi3ForCausalLM") or
            (smol and cfg.layer_types),
            f"{cfg.name}: sliding_window is only exported as MistralForCausalLM (or SmolLM3 with layer_types)")
    require(not cfg.nope_layers or smol, f"{cfg.name}: NoPE layers are only exported as SmolLM3ForCausalLM")
    require(cfg.layer_types is None or smol, f"{cfg.name}: per-layer kinds (layer_types) are only exported as "
            "SmolLM3ForCausalLM (or a Gemma class)")
    longrope = cfg.rope_scaling is not None and cfg.rope_scaling[0] == "longrope"
    require(cfg.rope_scaling is None or len(cfg.rope_scaling) == 4 or (longrope and arch == "Phi3ForCausalLM"),
            f"{cfg.name}: {arch} exports Llama-3 rope scaling (or LongRoPE as Phi3ForCausalLM) only, not "
            f"{'linear ' if cfg.rope_scaling and len(cfg.rope_scaling) == 1 else ''}{cfg.rope_scaling}")
    require(cfg.partial_rotary_factor == 1.0 or arch == "Phi3ForCausalLM",
            f"{cfg.name}: partial_rotary_factor < 1 is only exported as Phi3ForCausalLM")
    require(not olmo or cfg.head_dim * cfg.num_heads == cfg.hidden_size,
            f"{cfg.name}: {arch} needs head_dim * num_heads == hidden_size")
    out = {
        **shape_to_hf(cfg, MODEL_TYPES[arch]),
        "hidden_act": _ACTIVATIONS_TO_HF[cfg.hidden_act], **_rope_to_hf(cfg),
    }
    if arch in ("LlamaForCausalLM", "Qwen3ForCausalLM", "GemmaForCausalLM"):
        out["attention_bias"] = False
    if arch == "LlamaForCausalLM":
        out["mlp_bias"] = False
    if arch in ("MistralForCausalLM", "Phi3ForCausalLM"):
        out["sliding_window"] = cfg.sliding_window
    if arch == "Phi3ForCausalLM":
        out["original_max_position_embeddings"] = cfg.rope_scaling[3] if longrope else cfg.max_seq_len
        out["partial_rotary_factor"] = cfg.partial_rotary_factor
    if arch in ("Olmo2ForCausalLM", "SmolLM3ForCausalLM"):
        out["attention_bias"] = False
    if smol:
        out.update(no_rope_layers=[int(i not in cfg.nope_layers) for i in range(cfg.num_layers)],
                   use_sliding_window=cfg.sliding_window is not None, sliding_window=cfg.sliding_window,
                   layer_types=list(cfg.layer_types or ["full_attention"] * cfg.num_layers), mlp_bias=False)
    if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_layers,
                   layer_types=["full_attention"] * cfg.num_layers)
    return out


def decoder_weights(cfg: LlamaConfig, mlp_rules: list[Rule]) -> list[Rule]:
    """Embeddings, attention, norms and head of a Llama-style decoder, around `mlp_rules`."""
    d, v = cfg.hidden_size, cfg.vocab_size
    n, k, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    L = (("i", cfg.num_layers),)
    a = "model.layers.{i}.self_attn."
    norms = {"pre": (("input_layernorm", "attn_norm"), ("post_attention_layernorm", "mlp_norm")),
             "sandwich": (("input_layernorm", "attn_norm"), ("post_attention_layernorm", "attn_post_norm"),
                          ("pre_feedforward_layernorm", "mlp_norm"), ("post_feedforward_layernorm", "mlp_post_norm")),
             "post": (("post_attention_layernorm", "attn_post_norm"), ("post_feedforward_layernorm", "mlp_post_norm")),
             }[cfg.norm_placement]
    rules = [
        Rule("model.embed_tokens.weight", ("embed_tokens/embedding",), "copy", (v, d)),
        *(Rule(f"model.layers.{{i}}.{hf}.weight", (f"layers/{ours}/scale",), "copy", (d,), L) for hf, ours in norms),
        *([Rule(a + "qkv_proj.weight", tuple(f"layers/attn/{x}_proj/kernel" for x in "qkv"), "fused_linear",
                ((n + 2 * k) * h, d), L)] if cfg.architecture == "Phi3ForCausalLM" else
          [Rule(a + f"{x}_proj.weight", (f"layers/attn/{x}_proj/kernel",), "linear", (heads * h, d), L)
           for x, heads in (("q", n), ("k", k), ("v", k))]),
        Rule(a + "o_proj.weight", ("layers/attn/o_proj/kernel",), "linear", (d, n * h), L),
        *mlp_rules,
        Rule("model.norm.weight", ("norm/scale",), "copy", (d,)),
    ]
    if cfg.attention_bias:
        rules += [Rule(a + f"{x}_proj.bias", (f"layers/attn/{x}_proj/bias",), "copy", (heads * h,), L)
                  for x, heads in (("q", n), ("k", k), ("v", k))]
    if cfg.qk_norm:  # per head [H], or OLMo 2's over the whole projection [N*H] / [K*H]
        rules += [Rule(a + f"{x}_norm.weight", (f"layers/attn/{x}_norm/scale",), "copy",
                       (heads * h if cfg.qk_norm_flat else h,), L) for x, heads in (("q", n), ("k", k))]
    if not cfg.tie_word_embeddings:
        rules.append(Rule("lm_head.weight", ("lm_head/kernel",), "linear", (v, d)))
    return rules


def weights(cfg: LlamaConfig) -> list[Rule]:
    d, f = cfg.hidden_size, cfg.intermediate_size
    L = (("i", cfg.num_layers),)
    m = "model.layers.{i}.mlp."
    if cfg.architecture == "Phi3ForCausalLM":  # gate | up in one matrix
        gate_up = [Rule(m + "gate_up_proj.weight", ("layers/mlp/gate_proj/kernel", "layers/mlp/up_proj/kernel"),
                        "fused_linear", (2 * f, d), L)]
    else:
        gate_up = [Rule(m + f"{x}_proj.weight", (f"layers/mlp/{x}_proj/kernel",), "linear", (f, d), L)
                   for x in ("gate", "up")]
    return decoder_weights(cfg, [*gate_up, Rule(m + "down_proj.weight", ("layers/mlp/down_proj/kernel",), "linear",
                                                 (d, f), L)])


def decoder_spec(arch: str, config_from_hf, config_to_hf, weights) -> ArchSpec:
    """The ArchSpec of a Llama-style decoder class: rotary buffers ignored, an optional tied head."""
    return ArchSpec(
        config_from_hf=lambda hf, name: config_from_hf(hf, name, arch), config_to_hf=config_to_hf, weights=weights,
        ignore=(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$",),
        tied=lambda cfg: {"lm_head.weight": "model.embed_tokens.weight"} if cfg.tie_word_embeddings else {},
    )


ARCHITECTURES: dict[str, ArchSpec] = {arch: decoder_spec(arch, config_from_hf, config_to_hf, weights)
                                      for arch in LlamaConfig.ARCHITECTURES}
