"""Hugging Face <-> zoo conversion: config translation and weight tables per architecture.

Each supported HF class (config.json's `architectures[0]`) has one `ArchSpec`: a
config translation pair (HF dict <-> zoo config) and a weight table of `Rule`s.
A rule maps one HF tensor name pattern to one or more zoo parameter paths with an
exact, invertible layout change (transpose and/or reshape, or a split of a fused
tensor), so import followed by export is bit-identical. Stacked axes (the scanned
layer axis `{i}`, the expert axis `{e}` of MoE models) are placeholders in the HF pattern that
index the leading axes of the zoo parameter. New families (BERT, T5, MoE) add an
`ArchSpec` to `ARCHITECTURES`; nothing else here changes.

Import streams tensor by tensor from the safetensors files into one preallocated
numpy buffer per zoo parameter, so host memory stays near the checkpoint size.
Export writes into a new (absent or empty) directory only: it is built in a temporary
sibling and renamed into place once complete (`zoo.paths`); nothing already on disk is
replaced or deleted. Beside the weights travel the special token ids (config.json and
generation_config.json) and the tokenizer files (`HF_SIDE_FILES`).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import linen as nn

from zoo.configs import GPT2Config, LlamaConfig, ModelConfig, MoEConfig


class CheckpointError(ValueError):
    """A checkpoint that cannot be converted; the message names the file and the tensor."""


# --- layouts: exact, invertible HF <-> zoo transforms ------------------------------------
# "copy":   same values, reshaped (norm scales, embeddings, biases, GPT-2's Conv1D [in, out]).
# "linear": torch nn.Linear weight [out, in] -> zoo kernel [in..., out...] (transpose + reshape).
# "fused":  the HF tensor's last axis holds len(zoo) equal parts (GPT-2 c_attn = q|k|v).
LAYOUTS = ("copy", "linear", "fused")


@dataclass(frozen=True)
class Rule:
    """One HF tensor pattern <-> zoo parameter path(s).

    hf: name pattern; `{i}` (and any other placeholder named in `stack`) expands over
        the stacked leading axes of the zoo parameters.
    zoo: "/"-joined paths into the params tree (several for "fused").
    layout: one of LAYOUTS.
    hf_shape: the HF tensor's shape (one stacked index).
    stack: (placeholder, size) pairs, in the order of the zoo parameter's leading axes.
    """

    hf: str
    zoo: tuple[str, ...]
    layout: str
    hf_shape: tuple[int, ...]
    stack: tuple[tuple[str, int], ...] = ()

    def expand(self):
        """Yields (hf_key, stacked index) for every tensor this rule covers."""
        names = [n for n, _ in self.stack]
        for idx in itertools.product(*(range(size) for _, size in self.stack)):
            yield self.hf.format(**dict(zip(names, idx))), idx


def _to_zoo(rule: Rule, x: np.ndarray, zoo_shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
    """HF tensor -> zoo pieces (per stacked index), following the rule's layout."""
    if rule.layout == "copy":
        return [x.reshape(zoo_shapes[0])]
    if rule.layout == "linear":
        return [x.T.reshape(zoo_shapes[0])]
    if rule.layout == "fused":
        parts = np.split(x, len(rule.zoo), axis=-1)
        return [p.reshape(s) for p, s in zip(parts, zoo_shapes)]
    raise ValueError(f"unknown layout {rule.layout!r}")


def _to_hf(rule: Rule, pieces: list[np.ndarray]) -> np.ndarray:
    """Zoo pieces (per stacked index) -> the HF tensor: the exact inverse of `_to_zoo`."""
    if rule.layout == "copy":
        return pieces[0].reshape(rule.hf_shape)
    if rule.layout == "linear":
        return pieces[0].reshape(rule.hf_shape[::-1]).T
    if rule.layout == "fused":
        part_shape = rule.hf_shape[:-1] + (rule.hf_shape[-1] // len(pieces),)
        return np.concatenate([p.reshape(part_shape) for p in pieces], axis=-1)
    raise ValueError(f"unknown layout {rule.layout!r}")


@dataclass(frozen=True)
class ArchSpec:
    """Everything needed to convert one HF architecture.

    config_from_hf(hf_dict, name) -> zoo config; config_to_hf(cfg) -> HF dict;
    weights(cfg) -> list of Rules; ignore: regexes of HF keys that are buffers, not
    weights; tied(cfg) -> {alias key: source key} for tensors that may be present in a
    checkpoint but must equal their source (tied LM heads); normalize_key maps legacy
    key spellings to the table's.
    """

    config_from_hf: Callable[[dict, str], ModelConfig]
    config_to_hf: Callable[[ModelConfig], dict]
    weights: Callable[[ModelConfig], list[Rule]]
    ignore: tuple[str, ...] = ()
    tied: Callable[[ModelConfig], dict[str, str]] = lambda cfg: {}
    normalize_key: Callable[[str], str] = lambda key: key


# --- shared config helpers ------------------------------------------------------------

_ACTIVATIONS_FROM_HF = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
_ACTIVATIONS_TO_HF = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh"}


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise CheckpointError(message)


def _get(hf: dict, key: str, default=None):
    value = hf.get(key)
    return default if value is None else value


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
    _require(kind == "llama3", f"{arch}: rope scaling type {kind!r} is not supported (only 'llama3' or none)")
    return float(theta), (float(scaling["factor"]), float(scaling["low_freq_factor"]),
                          float(scaling["high_freq_factor"]), int(scaling["original_max_position_embeddings"]))


def _rope_to_hf(cfg: LlamaConfig) -> dict:
    """Both spellings: transformers>=5 reads `rope_parameters`, older versions the rest."""
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    legacy = None
    if cfg.rope_scaling is not None:
        factor, low, high, original = cfg.rope_scaling
        legacy = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                  "original_max_position_embeddings": original}
        params.update(legacy)
    return {"rope_parameters": params, "rope_theta": cfg.rope_theta, "rope_scaling": legacy}


def _dtype_name(dtype) -> str:
    return jnp.dtype(dtype).name


TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")
# What transformers' config class falls back to when config.json leaves an id out (classes
# not listed: None). Import fills these in, so the export means to transformers what the
# source meant, and writes every id explicitly.
_HF_TOKEN_DEFAULTS = {
    "GPT2LMHeadModel": (50256, 50256, None),
    "LlamaForCausalLM": (1, 2, None), "MistralForCausalLM": (1, 2, None), "MixtralForCausalLM": (1, 2, None),
    "GemmaForCausalLM": (2, 1, 0),
    "BertModel": (None, None, 0), "BertForMaskedLM": (None, None, 0), "BertForSequenceClassification": (None, None, 0),
}


def _token_ids_from_hf(hf: dict, arch: str) -> dict:
    """bos/eos/pad ids of an HF config dict (a list of eos ids becomes a tuple)."""
    out = {}
    for key, default in zip(TOKEN_ID_FIELDS, _HF_TOKEN_DEFAULTS.get(arch, (None, None, None))):
        value = hf[key] if key in hf else default
        out[key] = tuple(value) if isinstance(value, list) else value
    return out


def _token_ids_to_hf(cfg: ModelConfig) -> dict:
    return {key: list(v) if isinstance(v := getattr(cfg, key), tuple) else v for key in TOKEN_ID_FIELDS}


# --- GPT-2 ---------------------------------------------------------------------------

def _gpt2_config_from_hf(hf: dict, name: str) -> GPT2Config:
    arch = "GPT2LMHeadModel"
    act = hf.get("activation_function", "gelu_new")
    _require(act in ("gelu_new", "gelu_pytorch_tanh"),
             f"{arch}: activation_function {act!r} is not supported (only tanh GELU: gelu_new)")
    _require(hf.get("scale_attn_weights", True), f"{arch}: scale_attn_weights=false is not supported")
    _require(not hf.get("scale_attn_by_inverse_layer_idx", False),
             f"{arch}: scale_attn_by_inverse_layer_idx is not supported")
    _require(not hf.get("add_cross_attention", False), f"{arch}: add_cross_attention is not supported")
    _require(hf.get("tie_word_embeddings", True), f"{arch}: an untied LM head is not supported (GPT-2 ties it)")
    d = hf.get("n_embd", 768)
    return GPT2Config(
        name=name, vocab_size=hf.get("vocab_size", 50257), hidden_size=d, num_layers=hf.get("n_layer", 12),
        num_heads=hf.get("n_head", 12), intermediate_size=_get(hf, "n_inner", 4 * d),
        max_seq_len=hf.get("n_positions", 1024), layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
        **_token_ids_from_hf(hf, arch),
    )


def _gpt2_config_to_hf(cfg: GPT2Config) -> dict:
    _require(cfg.head_dim * cfg.num_heads == cfg.hidden_size,
             f"{cfg.name}: GPT2LMHeadModel needs head_dim * num_heads == hidden_size")
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": cfg.vocab_size, "n_embd": cfg.hidden_size, "n_layer": cfg.num_layers,
        "n_head": cfg.num_heads, "n_inner": cfg.intermediate_size, "n_positions": cfg.max_seq_len,
        "n_ctx": cfg.max_seq_len, "layer_norm_epsilon": cfg.layer_norm_epsilon, "activation_function": "gelu_new",
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True, **_token_ids_to_hf(cfg),
    }


def _gpt2_weights(cfg: GPT2Config) -> list[Rule]:
    d, f, v, p = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.max_seq_len
    L = (("i", cfg.num_layers),)
    h = "transformer.h.{i}."
    qkv = lambda leaf: tuple(f"layers/attn/{x}_proj/{leaf}" for x in "qkv")
    return [
        Rule("transformer.wte.weight", ("wte/embedding",), "copy", (v, d)),
        Rule("transformer.wpe.weight", ("wpe/embedding",), "copy", (p, d)),
        Rule(h + "ln_1.weight", ("layers/attn_norm/scale",), "copy", (d,), L),
        Rule(h + "ln_1.bias", ("layers/attn_norm/bias",), "copy", (d,), L),
        Rule(h + "attn.c_attn.weight", qkv("kernel"), "fused", (d, 3 * d), L),  # Conv1D: [in, out]
        Rule(h + "attn.c_attn.bias", qkv("bias"), "fused", (3 * d,), L),
        Rule(h + "attn.c_proj.weight", ("layers/attn/o_proj/kernel",), "copy", (d, d), L),
        Rule(h + "attn.c_proj.bias", ("layers/attn/o_proj/bias",), "copy", (d,), L),
        Rule(h + "ln_2.weight", ("layers/mlp_norm/scale",), "copy", (d,), L),
        Rule(h + "ln_2.bias", ("layers/mlp_norm/bias",), "copy", (d,), L),
        Rule(h + "mlp.c_fc.weight", ("layers/mlp/fc_in/kernel",), "copy", (d, f), L),
        Rule(h + "mlp.c_fc.bias", ("layers/mlp/fc_in/bias",), "copy", (f,), L),
        Rule(h + "mlp.c_proj.weight", ("layers/mlp/fc_out/kernel",), "copy", (f, d), L),
        Rule(h + "mlp.c_proj.bias", ("layers/mlp/fc_out/bias",), "copy", (d,), L),
        Rule("transformer.ln_f.weight", ("ln_f/scale",), "copy", (d,)),
        Rule("transformer.ln_f.bias", ("ln_f/bias",), "copy", (d,)),
    ]


def _gpt2_normalize_key(key: str) -> str:
    """OpenAI's original checkpoints (GPT2Model layout) lack the `transformer.` prefix."""
    return key if key.startswith(("transformer.", "lm_head.")) else "transformer." + key


GPT2_SPEC = ArchSpec(
    config_from_hf=_gpt2_config_from_hf, config_to_hf=_gpt2_config_to_hf, weights=_gpt2_weights,
    ignore=(r"transformer\.h\.\d+\.attn\.(bias|masked_bias)$",),
    tied=lambda cfg: {"lm_head.weight": "transformer.wte.weight"},
    normalize_key=_gpt2_normalize_key,
)


# --- Llama family: Llama, Mistral, Qwen2, Qwen3, Gemma --------------------------------

_LLAMA_MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
                      "Qwen3ForCausalLM": "qwen3", "GemmaForCausalLM": "gemma"}


def _llama_config_from_hf(hf: dict, name: str, arch: str) -> LlamaConfig:
    act = hf.get("hidden_activation") or hf.get("hidden_act") or ("gelu_pytorch_tanh" if arch == "GemmaForCausalLM"
                                                                    else "silu")
    if arch == "GemmaForCausalLM" and act == "gelu":
        act = "gelu_pytorch_tanh"  # Gemma's released configs say "gelu" but mean the tanh form (as transformers)
    _require(act in _ACTIVATIONS_FROM_HF,
             f"{arch}: hidden_act {act!r} is not supported (supported: {', '.join(_ACTIVATIONS_FROM_HF)})")
    _require(not hf.get("mlp_bias", False), f"{arch}: mlp_bias is not supported")
    attention_bias = arch == "Qwen2ForCausalLM"
    _require(bool(hf.get("attention_bias", attention_bias)) == attention_bias,
             f"{arch}: attention_bias={hf.get('attention_bias')} is not supported for this architecture")
    _require(not hf.get("use_sliding_window", False) or arch == "MistralForCausalLM",
             f"{arch}: use_sliding_window (per-layer windows) is not supported")
    layer_types = set(hf.get("layer_types") or ["full_attention"])
    _require(layer_types <= {"full_attention"}, f"{arch}: layer_types {sorted(layer_types)} is not supported")
    _require(not hf.get("use_bidirectional_attention"), f"{arch}: use_bidirectional_attention is not supported")
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        _require(hf.get(key) is None, f"{arch}: {key} is not supported")
    rope_theta, rope_scaling = _rope_from_hf(hf, arch)
    d, n = hf["hidden_size"], hf["num_attention_heads"]
    is_gemma = arch == "GemmaForCausalLM"
    return LlamaConfig(
        name=name, architecture=arch, vocab_size=hf["vocab_size"], hidden_size=d,
        num_layers=hf["num_hidden_layers"], num_heads=n, num_kv_heads=_get(hf, "num_key_value_heads", n),
        head_dim=_get(hf, "head_dim", d // n), intermediate_size=hf["intermediate_size"],
        max_seq_len=_get(hf, "max_position_embeddings", 2048), rope_theta=rope_theta, rope_scaling=rope_scaling,
        rms_norm_eps=_get(hf, "rms_norm_eps", 1e-6), tie_word_embeddings=bool(hf.get("tie_word_embeddings", is_gemma)),
        sliding_window=hf.get("sliding_window") if arch == "MistralForCausalLM" else None,
        attention_bias=attention_bias, qk_norm=arch == "Qwen3ForCausalLM", norm_offset=is_gemma,
        embed_scale=is_gemma, hidden_act=_ACTIVATIONS_FROM_HF[act], **_token_ids_from_hf(hf, arch),
    )


def _llama_config_to_hf(cfg: LlamaConfig) -> dict:
    arch = cfg.architecture
    # The switches are fixed per HF class; a combination no HF class implements cannot be exported.
    expected = dict(attention_bias=arch == "Qwen2ForCausalLM", qk_norm=arch == "Qwen3ForCausalLM",
                    norm_offset=arch == "GemmaForCausalLM", embed_scale=arch == "GemmaForCausalLM")
    for field, value in expected.items():
        _require(getattr(cfg, field) == value, f"{cfg.name}: {arch} needs {field}={value}")
    _require(cfg.sliding_window is None or arch == "MistralForCausalLM",
             f"{cfg.name}: sliding_window is only exported as MistralForCausalLM")
    out = {
        "architectures": [arch], "model_type": _LLAMA_MODEL_TYPES[arch],
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.rms_norm_eps,
        "hidden_act": _ACTIVATIONS_TO_HF[cfg.hidden_act], "tie_word_embeddings": cfg.tie_word_embeddings,
        **_rope_to_hf(cfg), **_token_ids_to_hf(cfg),
    }
    if arch in ("LlamaForCausalLM", "Qwen3ForCausalLM", "GemmaForCausalLM"):
        out["attention_bias"] = False
    if arch == "LlamaForCausalLM":
        out["mlp_bias"] = False
    if arch == "MistralForCausalLM":
        out["sliding_window"] = cfg.sliding_window
    if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_layers,
                   layer_types=["full_attention"] * cfg.num_layers)
    return out


def _llama_weights(cfg: LlamaConfig) -> list[Rule]:
    d, f = cfg.hidden_size, cfg.intermediate_size
    L = (("i", cfg.num_layers),)
    m = "model.layers.{i}.mlp."
    return _decoder_weights(cfg, [
        Rule(m + "gate_proj.weight", ("layers/mlp/gate_proj/kernel",), "linear", (f, d), L),
        Rule(m + "up_proj.weight", ("layers/mlp/up_proj/kernel",), "linear", (f, d), L),
        Rule(m + "down_proj.weight", ("layers/mlp/down_proj/kernel",), "linear", (d, f), L),
    ])


def _decoder_weights(cfg: LlamaConfig, mlp_rules: list[Rule]) -> list[Rule]:
    """Embeddings, attention, norms and head of a Llama-style decoder, around `mlp_rules`."""
    d, v = cfg.hidden_size, cfg.vocab_size
    n, k, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    L = (("i", cfg.num_layers),)
    a = "model.layers.{i}.self_attn."
    rules = [
        Rule("model.embed_tokens.weight", ("embed_tokens/embedding",), "copy", (v, d)),
        Rule("model.layers.{i}.input_layernorm.weight", ("layers/attn_norm/scale",), "copy", (d,), L),
        Rule(a + "q_proj.weight", ("layers/attn/q_proj/kernel",), "linear", (n * h, d), L),
        Rule(a + "k_proj.weight", ("layers/attn/k_proj/kernel",), "linear", (k * h, d), L),
        Rule(a + "v_proj.weight", ("layers/attn/v_proj/kernel",), "linear", (k * h, d), L),
        Rule(a + "o_proj.weight", ("layers/attn/o_proj/kernel",), "linear", (d, n * h), L),
        Rule("model.layers.{i}.post_attention_layernorm.weight", ("layers/mlp_norm/scale",), "copy", (d,), L),
        *mlp_rules,
        Rule("model.norm.weight", ("norm/scale",), "copy", (d,)),
    ]
    if cfg.attention_bias:
        rules += [Rule(a + f"{x}_proj.bias", (f"layers/attn/{x}_proj/bias",), "copy", (heads * h,), L)
                  for x, heads in (("q", n), ("k", k), ("v", k))]
    if cfg.qk_norm:
        rules += [Rule(a + f"{x}_norm.weight", (f"layers/attn/{x}_norm/scale",), "copy", (h,), L) for x in "qk"]
    if not cfg.tie_word_embeddings:
        rules.append(Rule("lm_head.weight", ("lm_head/kernel",), "linear", (v, d)))
    return rules


def _llama_spec(arch: str) -> ArchSpec:
    return ArchSpec(
        config_from_hf=lambda hf, name: _llama_config_from_hf(hf, name, arch),
        config_to_hf=_llama_config_to_hf, weights=_llama_weights,
        ignore=(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$",),
        tied=lambda cfg: {"lm_head.weight": "model.embed_tokens.weight"} if cfg.tie_word_embeddings else {},
    )


# --- Mixture-of-experts decoders: Mixtral, Qwen3-MoE ---------------------------------------
# Attention, norms and RoPE are those of the dense class named here, so the config
# translation reuses the Llama family's (its checks included) and adds the MoE fields.

_MOE_MODEL_TYPES = {"MixtralForCausalLM": "mixtral", "Qwen3MoeForCausalLM": "qwen3_moe"}
_MOE_DENSE_TWIN = {"MixtralForCausalLM": "MistralForCausalLM", "Qwen3MoeForCausalLM": "Qwen3ForCausalLM"}


def _moe_config_from_hf(hf: dict, name: str, arch: str) -> MoEConfig:
    is_qwen = arch == "Qwen3MoeForCausalLM"
    _require(not hf.get("router_jitter_noise"), f"{arch}: router_jitter_noise is not supported")
    if is_qwen:
        _require(_get(hf, "decoder_sparse_step", 1) == 1 and not hf.get("mlp_only_layers"),
                 f"{arch}: dense layers (decoder_sparse_step != 1 or mlp_only_layers) are not supported")
        _require(not hf.get("shared_expert_intermediate_size"), f"{arch}: shared experts are not supported")
    # transformers>=5 writes Qwen3-MoE's expert count as num_local_experts; Qwen's releases say num_experts.
    experts = hf["num_experts"] if is_qwen and "num_experts" in hf else hf["num_local_experts"]
    ffn = hf["moe_intermediate_size"] if is_qwen else hf["intermediate_size"]
    twin = _MOE_DENSE_TWIN[arch]
    try:
        dense = _llama_config_from_hf({**hf, "intermediate_size": ffn}, name, twin)
    except CheckpointError as e:  # the checks are shared; the message names the class read
        raise CheckpointError(str(e).replace(twin, arch)) from None
    fields = {f.name: getattr(dense, f.name) for f in dataclasses.fields(dense)}
    return MoEConfig(**{**fields, "architecture": arch}, num_experts=experts,
                     num_experts_per_tok=hf["num_experts_per_tok"],
                     norm_topk_prob=bool(hf.get("norm_topk_prob", False)) if is_qwen else True,
                     router_aux_loss_coef=float(_get(hf, "router_aux_loss_coef", 0.001)),
                     router_z_loss_coef=float(_get(hf, "router_z_loss_coef", 0.001)))


def _moe_config_to_hf(cfg: MoEConfig) -> dict:
    arch = cfg.architecture
    is_qwen = arch == "Qwen3MoeForCausalLM"
    _require(cfg.norm_topk_prob or is_qwen, f"{cfg.name}: {arch} always renormalises (needs norm_topk_prob=True)")
    _require(cfg.rope_scaling is None, f"{cfg.name}: {arch} has no Llama-3 rope scaling")
    twin = _MOE_DENSE_TWIN[arch]
    dense = LlamaConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(LlamaConfig)} | {
        "architecture": twin})
    try:
        out = _llama_config_to_hf(dense)
    except CheckpointError as e:
        raise CheckpointError(str(e).replace(twin, arch)) from None
    out.update(architectures=[arch], model_type=_MOE_MODEL_TYPES[arch], num_experts_per_tok=cfg.num_experts_per_tok,
               router_aux_loss_coef=cfg.router_aux_loss_coef, router_z_loss_coef=cfg.router_z_loss_coef,
               output_router_logits=False)
    if is_qwen:
        out.update(num_experts=cfg.num_experts, moe_intermediate_size=cfg.intermediate_size,
                   norm_topk_prob=cfg.norm_topk_prob, decoder_sparse_step=1, mlp_only_layers=[])
    else:
        out.update(num_local_experts=cfg.num_experts, router_jitter_noise=0.0)
    return out


def _moe_weights(cfg: MoEConfig) -> list[Rule]:
    d, f, e = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts
    L, LE = (("i", cfg.num_layers),), (("i", cfg.num_layers), ("e", e))
    if cfg.architecture == "MixtralForCausalLM":  # w1 gate, w3 up, w2 down
        m = "model.layers.{i}.block_sparse_moe."
        names = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
    else:
        m = "model.layers.{i}.mlp."
        names = {p: p for p in ("gate_proj", "up_proj", "down_proj")}
    return _decoder_weights(cfg, [
        Rule(m + "gate.weight", ("layers/mlp/router/kernel",), "linear", (e, d), L),
        *(Rule(m + f"experts.{{e}}.{names[p]}.weight", (f"layers/mlp/{p}",), "linear", shape, LE)
          for p, shape in (("gate_proj", (f, d)), ("up_proj", (f, d)), ("down_proj", (d, f)))),
    ])


def _moe_spec(arch: str) -> ArchSpec:
    return ArchSpec(
        config_from_hf=lambda hf, name: _moe_config_from_hf(hf, name, arch),
        config_to_hf=_moe_config_to_hf, weights=_moe_weights,
        ignore=(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$",),
        tied=lambda cfg: {"lm_head.weight": "model.embed_tokens.weight"} if cfg.tie_word_embeddings else {},
    )


ARCHITECTURES: dict[str, ArchSpec] = {
    "GPT2LMHeadModel": GPT2_SPEC,
    **{arch: _llama_spec(arch) for arch in _LLAMA_MODEL_TYPES},
    **{arch: _moe_spec(arch) for arch in _MOE_MODEL_TYPES},
}


def _spec(arch: str, where: str) -> ArchSpec:
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{where}: unsupported architecture {arch!r}; supported: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[arch]


# --- public config translation -----------------------------------------------------------

def config_from_hf(hf_config: dict, name: str = "hf", dtype=None, where: str = "config") -> ModelConfig:
    """A zoo config from an HF config.json dict.

    dtype: compute and param dtype; None keeps the zoo defaults (bf16 compute, float32
    params), which is what training from scratch wants. Raises CheckpointError for an
    unsupported architecture or config feature, or a missing required field.
    """
    archs = hf_config.get("architectures") or []
    if not archs:
        raise CheckpointError(f"{where}: no `architectures` entry; supported: {', '.join(ARCHITECTURES)}")
    spec = _spec(archs[0], where)
    try:
        cfg = spec.config_from_hf(hf_config, name)
    except KeyError as e:
        raise CheckpointError(f"{where}: {archs[0]} config is missing the field {e}") from None
    except CheckpointError as e:
        raise CheckpointError(f"{where}: {e}") from None
    if dtype is None:
        return cfg
    return cfg.replace(dtype=_dtype_name(dtype), param_dtype=_dtype_name(dtype))


def config_to_hf(cfg: ModelConfig) -> dict:
    """The HF config.json dict (architectures, model_type and every field transformers needs)."""
    out = _spec(cfg.hf_architecture, cfg.name).config_to_hf(cfg)
    out["dtype"] = cfg.param_dtype
    out["torch_dtype"] = cfg.param_dtype  # transformers<5 reads this spelling
    return out


# --- safetensors reading ----------------------------------------------------------------

_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
              "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2, "I64": np.int64,
              "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


class _SafetensorsFile:
    """One .safetensors file: keys, shapes, and tensors read one at a time.

    safe_open validates the header and that the data covers it (a truncated file fails
    here); numpy has no bfloat16, so each tensor is read by the header's offsets, which
    serves every dtype the same way. Plain reads rather than a memory map: only the
    tensor being converted occupies host memory beside the destination buffers.
    """

    def __init__(self, path: Path):
        from safetensors import SafetensorError, safe_open

        self.path = path
        try:
            with safe_open(str(path), framework="numpy") as f:
                self.keys = list(f.keys())
        except (SafetensorError, OSError) as e:
            cut = _first_cut_tensor(path)
            where = f" (tensor {cut!r} extends past the end of the file)" if cut else ""
            raise CheckpointError(f"{path}: cannot read safetensors file (truncated or corrupt?){where}: {e}") from e
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            self.header = json.loads(fh.read(n))
        self.data_start = 8 + n

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.header[key]["shape"])

    def read(self, key: str) -> np.ndarray:
        info = self.header[key]
        if info["dtype"] not in _ST_DTYPES:
            raise CheckpointError(f"{self.path}: tensor {key!r} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        raw = np.fromfile(self.path, dtype=np.uint8, count=end - begin, offset=self.data_start + begin)
        return raw.view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"])


def _first_cut_tensor(path: Path) -> str | None:
    """The first tensor whose data lies past the end of a truncated file; None when the
    header itself does not parse (safetensors' own message then says what is wrong)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if n > size:
                return None
            header = json.loads(fh.read(n))
        ends = sorted((info["data_offsets"][1], key) for key, info in header.items() if key != "__metadata__")
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError):
        return None
    return next((key for end, key in ends if 8 + n + end > size), None)


def _checkpoint_files(root: Path) -> list[Path]:
    single, index = root / "model.safetensors", root / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a safetensors index (needs a `weight_map`): {e}") from e
        files = [root / name for name in dict.fromkeys(weight_map.values())]
        for file in files:
            if not file.exists():
                raise CheckpointError(f"{index}: shard {file.name} is missing")
        return files
    if single.exists():
        return [single]
    raise CheckpointError(f"{root}: no model.safetensors or model.safetensors.index.json")


# --- import ------------------------------------------------------------------------------

def _abstract_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Zoo param path -> shape, from `jax.eval_shape` (nothing allocated)."""
    import jax

    from zoo import abstract_params

    tree = nn.unbox(abstract_params(model.cfg))
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(p.key for p in path): tuple(x.shape) for path, x in flat}


def _nest(flat: dict[str, Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def from_hf(path, dtype=jnp.float32):
    """Loads an HF checkpoint dir (config.json + model.safetensors or a sharded index).

    Returns (model, params) with plain (unboxed) arrays of `dtype`. Raises
    FileNotFoundError without config.json and CheckpointError (naming file and tensor)
    for an unsupported architecture, missing, unexpected or mis-shaped tensors, or an
    unreadable safetensors file.
    """
    from zoo import build

    root = Path(path)
    if root.name == "config.json":
        root = root.parent
    config_path = root / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path} not found: an HF checkpoint dir needs config.json")
    try:
        hf_config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_path}: not valid JSON: {e}") from e
    cfg = config_from_hf(hf_config, name=root.resolve().name, dtype=dtype, where=str(config_path))
    spec = ARCHITECTURES[hf_config["architectures"][0]]
    model = build(cfg)
    zoo_shapes = _abstract_shapes(model)
    np_dtype = np.dtype(jnp.dtype(dtype))

    rules = spec.weights(cfg)
    expected = {key: (rule, idx) for rule in rules for key, idx in rule.expand()}
    tied = spec.tied(cfg)
    ignore = [re.compile(p) for p in spec.ignore]
    buffers = {p: np.empty(zoo_shapes[p], np_dtype) for rule in rules for p in rule.zoo}
    loaded: set[str] = set()
    aliases: list[tuple[_SafetensorsFile, str, str]] = []

    files = [_SafetensorsFile(f) for f in _checkpoint_files(root)]
    for file in files:
        for raw_key in file.keys:
            key = spec.normalize_key(raw_key)
            if any(p.search(key) for p in ignore):
                continue
            if key in tied:
                aliases.append((file, raw_key, tied[key]))
                continue
            if key not in expected:
                raise CheckpointError(f"{file.path}: unexpected tensor {raw_key!r} for {cfg.hf_architecture}")
            if key in loaded:
                raise CheckpointError(f"{file.path}: tensor {raw_key!r} appears twice in the checkpoint")
            rule, idx = expected[key]
            if file.shape(raw_key) != rule.hf_shape:
                raise CheckpointError(f"{file.path}: tensor {raw_key!r} has shape {file.shape(raw_key)}, "
                                      f"expected {rule.hf_shape}")
            pieces = _to_zoo(rule, file.read(raw_key), [zoo_shapes[p][len(idx):] for p in rule.zoo])
            for p, piece in zip(rule.zoo, pieces):
                buffers[p][idx] = piece  # casts to `dtype` in place
            # Release this tensor before the next read, or two (the largest, often the
            # adjacent embedding and lm_head) sit beside the buffers at once.
            del pieces, piece
            loaded.add(key)

    missing = [k for k in expected if k not in loaded]
    if missing:
        where = ", ".join(str(f.path) for f in files)
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{where}: missing tensor {missing[0]!r}{more}")
    for file, raw_key, source in aliases:
        rule, idx = expected[source]
        _require(rule.layout == "copy" and not idx, f"internal: tied source {source} must be a plain copy")
        if file.shape(raw_key) != rule.hf_shape or not np.array_equal(file.read(raw_key).astype(np_dtype),
                                                                         buffers[rule.zoo[0]]):
            raise CheckpointError(f"{file.path}: tensor {raw_key!r} must equal {source!r} "
                                  "(tied embeddings) but differs")

    params = {p: jnp.asarray(buffers.pop(p)) for p in list(buffers)}
    return model, _nest(params)


# --- export ------------------------------------------------------------------------------

def _write_safetensors(path: Path, tensors: list[tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]]):
    """Writes a safetensors file tensor by tensor: (key, shape, dtype, produce) entries.

    The header is known up front from shapes and dtypes, so only one tensor is in
    host memory at a time; numpy's missing bfloat16 is no obstacle either.
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, shape, dtype, _ in tensors:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[key] = {"dtype": _ST_NAMES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format pads the header to 8-byte alignment
    with open(path, "wb") as fh:
        fh.write(len(blob).to_bytes(8, "little"))
        fh.write(blob)
        for key, shape, dtype, produce in tensors:
            x = produce()
            if x.shape != tuple(shape) or x.dtype != np.dtype(dtype):
                raise CheckpointError(f"{path}: internal: tensor {key!r} is {x.shape} {x.dtype}, "
                                      f"expected {tuple(shape)} {np.dtype(dtype)}")
            fh.write(np.ascontiguousarray(x).tobytes())
        fh.flush()
        os.fsync(fh.fileno())


def _hf_tensor(rule: Rule, arrays: list[np.ndarray], idx: tuple[int, ...]) -> np.ndarray:
    """One HF tensor from the zoo arrays of a rule, at one stacked index."""
    return _to_hf(rule, [a[idx] for a in arrays])


# The Hugging Face files that travel beside the weights: tokenizers (every format
# transformers reads), their settings, the generation defaults and chat templates.
HF_SIDE_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
    "tokenizer.tiktoken", "generation_config.json", "chat_template.jinja", "chat_template.json",
)


def side_files(src_dir) -> list[str]:
    """Names of the `HF_SIDE_FILES` present in `src_dir` (in that order)."""
    root = Path(src_dir)
    return [name for name in HF_SIDE_FILES if (root / name).is_file()]


def copy_side_files(src_dir, dst_dir) -> list[str]:
    """Copies the `HF_SIDE_FILES` present in `src_dir` into `dst_dir`, byte for byte (the
    contents, not links or permissions); returns the names copied."""
    src, dst = Path(src_dir), Path(dst_dir)
    names = side_files(src)
    for name in names:
        if not ((dst / name).exists() and os.path.samefile(src / name, dst / name)):
            shutil.copyfile(src / name, dst / name)
    return names


_BOS_PIECES = ("<s>", "<|begin_of_text|>", "<bos>", "<|endoftext|>")
_PAD_PIECES = ("<pad>", "[PAD]", "<|pad|>")
_UNK_PIECES = ("<unk>", "[UNK]")
_BERT_PIECES = {"cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]"}


def _tokenizer_specials(tokenizer) -> tuple[dict[str, int], dict[str, str]]:
    """The special tokens of a `zoo.data.Tokenizer`: ({bos/eos/pad: id}, {HF *_token name: text}).

    eos is the tokenizer's `eos_id` (what zoo training appends to every document). A
    sentencepiece model declares bos, pad and unk; a tokenizer.json's are looked up by the
    usual spellings. An id the tokenizer does not have is left out."""
    if tokenizer.path.endswith(".json"):
        from tokenizers import Tokenizer as HFTokenizer

        hf = HFTokenizer.from_file(tokenizer.path)
        vocab = hf.get_vocab(with_added_tokens=True)
        text = hf.id_to_token

        def find(pieces):
            return next((vocab[p] for p in pieces if p in vocab), None)

        found = {"bos": find(_BOS_PIECES), "pad": find(_PAD_PIECES), "unk": find(_UNK_PIECES),
                 **{k: vocab.get(v) for k, v in _BERT_PIECES.items()}}
    else:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=tokenizer.path)
        text = sp.id_to_piece
        found = {"bos": sp.bos_id(), "pad": sp.pad_id(), "unk": sp.unk_id()}
    found["eos"] = tokenizer.eos_id
    for key in ("bos", "pad"):  # a Tokenizer that knows its own ids says so
        if getattr(tokenizer, f"{key}_id", None) is not None:
            found[key] = getattr(tokenizer, f"{key}_id")
    found = {k: int(v) for k, v in found.items() if v is not None and v >= 0}
    ids = {f"{k}_token_id": found[k] for k in ("bos", "eos", "pad") if k in found}
    names = {(k if k.endswith("_token") else f"{k}_token"): text(v) for k, v in found.items()}
    return ids, names


def _write_tokenizer(tokenizer, names: dict[str, str], cfg: ModelConfig, out: Path) -> None:
    """The tokenizer file under the name transformers looks for, and the settings that make
    `AutoTokenizer.from_pretrained(out)` load it with these special tokens and encode as
    zoo's Tokenizer does (no bos/eos added). transformers' generic fast tokenizer reads a
    tokenizer.json, and converts a sentencepiece tokenizer.model keeping its normaliser
    (LlamaTokenizer would add a dummy-prefix space the zoo's models never use)."""
    name = "tokenizer.json" if tokenizer.path.endswith(".json") else "tokenizer.model"
    shutil.copyfile(tokenizer.path, out / name)
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", **names, "add_bos_token": False,
                "add_eos_token": False, "clean_up_tokenization_spaces": False, "model_max_length": cfg.max_seq_len}
    (out / "tokenizer_config.json").write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(names, indent=2, ensure_ascii=False) + "\n")


def _generation_config(hf_config: dict, base: dict | None = None) -> dict:
    """generation_config.json: `base`'s settings with the special ids of config.json."""
    out = dict(base or {})
    for key in (*TOKEN_ID_FIELDS, "decoder_start_token_id"):
        if hf_config.get(key) is not None:
            out[key] = hf_config[key]
        else:
            out.pop(key, None)
    return out


def to_hf(model: nn.Module, params, out_dir, *, tokenizer=None, side_files_from=None) -> None:
    """Writes `out_dir`: config.json + model.safetensors that transformers loads, the
    tokenizer files and generation_config.json.

    out_dir must not exist yet or be an empty directory (`zoo.paths.check_new_dir`; checked
    before any work, an OutputError otherwise). It is built in a temporary sibling that
    becomes `out_dir` only once complete, with the umask's permissions; on failure the
    temporary dir is removed and nothing at `out_dir` changes.

    side_files_from: a dir (an HF checkpoint, or a zoo run dir that `python -m zoo convert`
        made from one) whose `HF_SIDE_FILES` are copied verbatim. When they include a
        tokenizer_config.json they are the tokenizer, and config.json keeps the config's ids.
    tokenizer: a `zoo.data.Tokenizer` (the run's own); used when `side_files_from` brings no
        tokenizer_config.json. Its file is written as tokenizer.json or tokenizer.model with
        a tokenizer_config.json and special_tokens_map.json, and its bos/eos/pad ids
        replace the config's in config.json (a zoo run's eos is what its tokenizer appends).
    generation_config.json carries config.json's ids (a copied one keeps its other settings).
    """
    import jax

    from zoo.paths import check_new_dir, staged_dir

    sources = [s for s in (side_files_from, getattr(tokenizer, "path", None)) if s is not None]
    out = check_new_dir(out_dir, flag="out_dir", sources=sources)
    cfg = model.cfg
    spec = _spec(cfg.hf_architecture, cfg.name)
    hf_config = config_to_hf(cfg)
    copied = side_files(side_files_from) if side_files_from is not None else []
    use_tokenizer = tokenizer is not None and "tokenizer_config.json" not in copied
    names: dict[str, str] = {}
    if use_tokenizer:
        ids, names = _tokenizer_specials(tokenizer)
        hf_config.update(ids)
        # The tokenizer's files replace the source's; its ids replace those of a copied generation config.
        copied = [n for n in copied if n in ("generation_config.json", "chat_template.jinja", "chat_template.json")]
    flat = {"/".join(p.key for p in path): x
            for path, x in jax.tree_util.tree_flatten_with_path(nn.unbox(params))[0]}
    rules = spec.weights(cfg)
    needed = {p for rule in rules for p in rule.zoo}
    if set(flat) != needed:
        raise CheckpointError(f"{cfg.name}: params do not match the {cfg.hf_architecture} weight table; "
                              f"missing {sorted(needed - set(flat))}, extra {sorted(set(flat) - needed)}")
    host = {p: np.asarray(jax.device_get(x)) for p, x in flat.items()}
    tensors = []
    for rule in rules:
        arrays = [host[p] for p in rule.zoo]
        dtype = arrays[0].dtype
        for key, idx in rule.expand():
            tensors.append((key, rule.hf_shape, dtype, lambda r=rule, a=arrays, i=idx: _hf_tensor(r, a, i)))
    tensors.sort(key=lambda t: t[0])

    with staged_dir(out) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
        _write_safetensors(tmp / "model.safetensors", tensors)
        for name in copied:
            shutil.copyfile(Path(side_files_from) / name, tmp / name)
        if use_tokenizer:
            _write_tokenizer(tokenizer, names, cfg, tmp)
        gen = tmp / "generation_config.json"
        if use_tokenizer or not gen.exists():
            base = json.loads(gen.read_text()) if gen.exists() else None
            gen.write_text(json.dumps(_generation_config(hf_config, base), indent=2, sort_keys=True) + "\n")


__all__ = ["ARCHITECTURES", "ArchSpec", "Rule", "CheckpointError", "from_hf", "to_hf", "config_from_hf",
           "config_to_hf", "HF_SIDE_FILES", "side_files", "copy_side_files", "TOKEN_ID_FIELDS"]

# The BERT and T5 tables live in zoo/hf_encoders.py, which registers them in ARCHITECTURES.
import zoo.hf_encoders  # noqa: E402,F401
