"""GPT2LMHeadModel <-> zoo GPT-2: config translation and weight table (zoo.hf.rules)."""

from __future__ import annotations

from zoo.hf.rules import ArchSpec, Rule, dense, get, layer_norm, require, token_ids_from_hf, token_ids_to_hf
from zoo.models.gpt2.config import GPT2Config

ARCH = "GPT2LMHeadModel"


def config_from_hf(hf: dict, name: str) -> GPT2Config:
    act = hf.get("activation_function", "gelu_new")
    require(act in ("gelu_new", "gelu_pytorch_tanh"),
            f"{ARCH}: activation_function {act!r} is not supported (only tanh GELU: gelu_new)")
    require(hf.get("scale_attn_weights", True), f"{ARCH}: scale_attn_weights=false is not supported")
    require(not hf.get("scale_attn_by_inverse_layer_idx", False),
            f"{ARCH}: scale_attn_by_inverse_layer_idx is not supported")
    require(not hf.get("add_cross_attention", False), f"{ARCH}: add_cross_attention is not supported")
    require(hf.get("tie_word_embeddings", True), f"{ARCH}: an untied LM head is not supported (GPT-2 ties it)")
    d = hf.get("n_embd", 768)
    return GPT2Config(
        name=name, vocab_size=hf.get("vocab_size", 50257), hidden_size=d, num_layers=hf.get("n_layer", 12),
        num_heads=hf.get("n_head", 12), intermediate_size=get(hf, "n_inner", 4 * d),
        max_seq_len=hf.get("n_positions", 1024), layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
        **token_ids_from_hf(hf, (50256, 50256, None)),  # transformers' GPT2Config defaults
    )


def config_to_hf(cfg: GPT2Config) -> dict:
    require(cfg.head_dim * cfg.num_heads == cfg.hidden_size,
            f"{cfg.name}: {ARCH} needs head_dim * num_heads == hidden_size")
    return {
        "architectures": [ARCH], "model_type": "gpt2",
        "vocab_size": cfg.vocab_size, "n_embd": cfg.hidden_size, "n_layer": cfg.num_layers,
        "n_head": cfg.num_heads, "n_inner": cfg.intermediate_size, "n_positions": cfg.max_seq_len,
        "n_ctx": cfg.max_seq_len, "layer_norm_epsilon": cfg.layer_norm_epsilon, "activation_function": "gelu_new",
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True, **token_ids_to_hf(cfg),
    }


def weights(cfg: GPT2Config) -> list[Rule]:
    d, f, v, p = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.max_seq_len
    L = (("i", cfg.num_layers),)
    h = "transformer.h.{i}."
    qkv = lambda leaf: tuple(f"layers/attn/{x}_proj/{leaf}" for x in "qkv")
    return [
        Rule("transformer.wte.weight", ("wte/embedding",), "copy", (v, d)),
        Rule("transformer.wpe.weight", ("wpe/embedding",), "copy", (p, d)),
        *layer_norm(h + "ln_1", "layers/attn_norm", d, L),
        Rule(h + "attn.c_attn.weight", qkv("kernel"), "fused", (d, 3 * d), L),  # Conv1D: [in, out]
        Rule(h + "attn.c_attn.bias", qkv("bias"), "fused", (3 * d,), L),
        *dense(h + "attn.c_proj", "layers/attn/o_proj", "copy", (d, d), L),
        *layer_norm(h + "ln_2", "layers/mlp_norm", d, L),
        *dense(h + "mlp.c_fc", "layers/mlp/fc_in", "copy", (d, f), L),
        *dense(h + "mlp.c_proj", "layers/mlp/fc_out", "copy", (f, d), L),
        *layer_norm("transformer.ln_f", "ln_f", d),
    ]


def normalize_key(key: str) -> str:
    """OpenAI's original checkpoints (GPT2Model layout) lack the `transformer.` prefix."""
    return key if key.startswith(("transformer.", "lm_head.")) else "transformer." + key


ARCHITECTURES: dict[str, ArchSpec] = {ARCH: ArchSpec(
    config_from_hf=config_from_hf, config_to_hf=config_to_hf, weights=weights,
    ignore=(r"transformer\.h\.\d+\.attn\.(bias|masked_bias)$",),
    tied=lambda cfg: {"lm_head.weight": "transformer.wte.weight"},
    normalize_key=normalize_key,
)}
