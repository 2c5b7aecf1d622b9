"""Gemma2ForCausalLM / Gemma3ForCausalLM <-> zoo Gemma: config translation; the weight table
is the Llama decoder's with sandwich norms (zoo/models/llama/hf.py).

Gemma 3 4B and up ship as Gemma3ForConditionalGeneration (text + vision): its text tower
imports (`IMPORTS`: config.json's text_config, the `model.language_model.*` tensors, the
vision tower and projector left out) as a Gemma3ForCausalLM, which is what it exports as.
"""

from __future__ import annotations

from typing import Any

from zoo.hf.rules import ArchSpec, get, require, text_tower_config, text_tower_key, token_ids_from_hf
from zoo.models.gemma.config import GemmaConfig, alternating
from zoo.models.llama import hf as llama_hf

MODEL_TYPES = {"Gemma2ForCausalLM": "gemma2", "Gemma3ForCausalLM": "gemma3_text"}
_PERIOD = {"Gemma2ForCausalLM": 2, "Gemma3ForCausalLM": 6}  # HF's default alternation (1 global in N)
_DEFAULT_THETA = {"Gemma2ForCausalLM": (10_000.0, None), "Gemma3ForCausalLM": (1_000_000.0, 10_000.0)}


def _rope_type(params: dict, arch: str, layers: str) -> tuple | None:
    """rope_scaling tuple of one rope_parameters entry: None (default) or (factor,) (linear)."""
    kind = params.get("rope_type", params.get("type", "default"))
    require(kind in ("default", "linear"),
            f"{arch}: rope type {kind!r} of the {layers} layers is not supported (only 'default' or 'linear')")
    return (float(params["factor"]),) if kind == "linear" else None


def _rope_from_hf(hf: dict, arch: str) -> dict:
    theta, local = _DEFAULT_THETA[arch]
    params = dict(hf.get("rope_parameters") or {})
    if arch == "Gemma2ForCausalLM":
        params = params or dict(hf.get("rope_scaling") or {})
        return dict(rope_theta=float(params.get("rope_theta", get(hf, "rope_theta", theta))),
                    rope_scaling=_rope_type(params, arch, "all"))
    full = dict(params.get("full_attention") or hf.get("rope_scaling") or {})
    sliding = dict(params.get("sliding_attention") or {})
    require(_rope_type(sliding, arch, "sliding") is None, f"{arch}: scaled RoPE on sliding layers is not supported")
    return dict(rope_theta=float(full.get("rope_theta", get(hf, "rope_theta", theta))),
                rope_local_theta=float(sliding.get("rope_theta", get(hf, "rope_local_base_freq", local))),
                rope_scaling=_rope_type(full, arch, "full-attention"))


def config_from_hf(hf: dict, name: str, arch: str) -> GemmaConfig:
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    require(act in ("gelu_pytorch_tanh", "gelu_new", "gelu"), f"{arch}: hidden_activation {act!r} is not supported")
    for key in ("attention_bias", "use_bidirectional_attention", "mlp_bias"):
        require(not hf.get(key), f"{arch}: {key} is not supported")
    n_layers, d, n = hf["num_hidden_layers"], hf["hidden_size"], hf["num_attention_heads"]
    layer_types = tuple(hf.get("layer_types") or alternating(
        n_layers, get(hf, "sliding_window_pattern", _PERIOD[arch])))
    head_dim = get(hf, "head_dim", d // n)
    return GemmaConfig(
        name=name, architecture=arch, vocab_size=hf["vocab_size"], hidden_size=d, num_layers=n_layers,
        num_heads=n, num_kv_heads=get(hf, "num_key_value_heads", n), head_dim=head_dim,
        intermediate_size=hf["intermediate_size"], max_seq_len=get(hf, "max_position_embeddings", 8192),
        rms_norm_eps=get(hf, "rms_norm_eps", 1e-6), tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        sliding_window=hf.get("sliding_window"), layer_types=layer_types, qk_norm=arch == "Gemma3ForCausalLM",
        query_pre_attn_scalar=float(get(hf, "query_pre_attn_scalar", head_dim)),
        attn_logit_softcap=hf.get("attn_logit_softcapping"), final_logit_softcap=hf.get("final_logit_softcapping"),
        **_rope_from_hf(hf, arch), **token_ids_from_hf(hf, (2, 1, 0)),
    )


def _rope_params(theta: float, scaling: tuple | None) -> dict:
    out: dict[str, Any] = {"rope_type": "default", "rope_theta": theta}
    if scaling is not None:
        out.update(rope_type="linear", factor=scaling[0])
    return out


def config_to_hf(cfg: GemmaConfig) -> dict:
    arch = cfg.architecture
    require(not cfg.nope_layers and not cfg.qk_norm_flat and not cfg.attention_bias,
            f"{cfg.name}: {arch} has RoPE on every layer, per-head q/k norms and no biases")
    scalar = cfg.query_pre_attn_scalar if cfg.query_pre_attn_scalar is not None else cfg.head_dim
    require(float(scalar).is_integer(), f"{cfg.name}: {arch} needs an integer query_pre_attn_scalar, got {scalar}")
    out = {
        **llama_hf.shape_to_hf(cfg, MODEL_TYPES[arch]),
        "hidden_activation": "gelu_pytorch_tanh", "attention_bias": False, "query_pre_attn_scalar": int(scalar),
        "sliding_window": cfg.sliding_window,
        "layer_types": list(cfg.layer_types or ["full_attention"] * cfg.num_layers),
        "attn_logit_softcapping": cfg.attn_logit_softcap, "final_logit_softcapping": cfg.final_logit_softcap,
    }
    if arch == "Gemma2ForCausalLM":
        out["rope_parameters"] = _rope_params(cfg.rope_theta, cfg.rope_scaling)
        out["rope_theta"] = cfg.rope_theta
    else:
        out["rope_parameters"] = {"full_attention": _rope_params(cfg.rope_theta, cfg.rope_scaling),
                                  "sliding_attention": _rope_params(cfg.rope_local_theta or cfg.rope_theta, None)}
    return out


ARCHITECTURES: dict[str, ArchSpec] = {
    arch: llama_hf.decoder_spec(arch, config_from_hf, config_to_hf, llama_hf.weights)
    for arch in GemmaConfig.ARCHITECTURES}


def _text_tower_config(hf: dict, name: str) -> GemmaConfig:
    return config_from_hf(text_tower_config(hf, "Gemma3ForConditionalGeneration"), name, "Gemma3ForCausalLM")


# Import-only classes: loaded as the family's own class (zoo.registry's `hf_imports`).
IMPORTS: dict[str, ArchSpec] = {
    "Gemma3ForConditionalGeneration": ArchSpec(
        config_from_hf=_text_tower_config, config_to_hf=config_to_hf, weights=llama_hf.weights,
        ignore=(r"^(model\.)?vision_tower\.", r"^(model\.)?multi_modal_projector\.",
                r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$"),
        tied=lambda cfg: {"lm_head.weight": "model.embed_tokens.weight"} if cfg.tie_word_embeddings else {},
        normalize_key=text_tower_key),
}
