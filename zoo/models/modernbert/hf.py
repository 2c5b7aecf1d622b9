"""ModernBertModel / ModernBertForMaskedLM / ModernBertForSequenceClassification <-> zoo ModernBERT:
config translation and weight table (zoo.hf.rules).

HF nests the backbone under `model.` in the head classes but not in ModernBertModel; keys are
normalised to the class's own spelling. Wqkv [3D, D] is q | k | v; Wi [2F, D] is the GELU half
then the linear half (zoo gate_proj | up_proj). HF's layer 0 has no attn_norm: it is the zoo's
`first_layer`, and HF layers 1.. are the scanned `layers`.
"""

from __future__ import annotations

from zoo.hf.rules import ArchSpec, Rule, get, require, token_ids_from_hf, token_ids_to_hf
from zoo.models.modernbert.config import ModernBertConfig


def _layer_types(hf: dict) -> list[str]:
    every = get(hf, "global_attn_every_n_layers", 3)
    return list(hf.get("layer_types") or ["full_attention" if i % every == 0 else "sliding_attention"
                                          for i in range(hf["num_hidden_layers"])])


def _theta(hf: dict, kind: str, legacy: str, default: float) -> float:
    params = (hf.get("rope_parameters") or {}).get(kind) or {}
    require(params.get("rope_type", "default") == "default",
            f"ModernBERT: rope scaling {params.get('rope_type')!r} is not supported")
    return float(params.get("rope_theta", get(hf, legacy, default)))


def config_from_hf(hf: dict, name: str, arch: str) -> ModernBertConfig:
    for key, want in (("hidden_activation", "gelu"), ("classifier_activation", "gelu")):
        require(get(hf, key, "gelu") == want, f"{arch}: {key} {hf.get(key)!r} is not supported (only 'gelu')")
    for key in ("norm_bias", "attention_bias", "mlp_bias", "classifier_bias"):
        require(not hf.get(key, False), f"{arch}: {key}=True is not supported")
    require(get(hf, "decoder_bias", True), f"{arch}: decoder_bias=False is not supported")
    require(not hf.get("sparse_prediction", False), f"{arch}: sparse_prediction is not supported")
    types = _layer_types(hf)
    every = next((i for i, t in enumerate(types) if i and t == "full_attention"), len(types))
    require(types == ["full_attention" if i % every == 0 else "sliding_attention" for i in range(len(types))],
            f"{arch}: layer_types must repeat one global layer then local ones (got {types})")
    require(hf.get("tie_word_embeddings", True), f"{arch}: an untied decoder is not supported")
    num_labels = len(hf["id2label"]) if hf.get("id2label") else hf.get("num_labels", 2)
    vocab = hf.get("vocab_size", 50368)
    return ModernBertConfig(
        name=name, architecture=arch, vocab_size=vocab, hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
        intermediate_size=hf["intermediate_size"], max_seq_len=get(hf, "max_position_embeddings", 8192),
        local_attention=get(hf, "local_attention", 128), global_attn_every_n_layers=every,
        global_rope_theta=_theta(hf, "full_attention", "global_rope_theta", 160000.0),
        local_rope_theta=_theta(hf, "sliding_attention", "local_rope_theta", 10000.0),
        norm_eps=get(hf, "norm_eps", 1e-5), classifier_pooling=get(hf, "classifier_pooling", "cls"),
        num_labels=num_labels, mask_token_id=50284 if vocab > 50284 else vocab - 1,
        **token_ids_from_hf(hf, (50281, 50282, 50283)),
    )


def config_to_hf(cfg: ModernBertConfig) -> dict:
    require(cfg.head_dim * cfg.num_heads == cfg.hidden_size,
            f"{cfg.name}: ModernBERT needs head_dim * num_heads == hidden_size")
    types = ["full_attention" if cfg.is_global(i) else "sliding_attention" for i in range(cfg.num_layers)]
    return {
        "architectures": [cfg.architecture], "model_type": "modernbert",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "intermediate_size": cfg.intermediate_size,
        "hidden_activation": "gelu", "max_position_embeddings": cfg.max_seq_len, "norm_eps": cfg.norm_eps,
        "norm_bias": False, "attention_bias": False, "mlp_bias": False, "decoder_bias": True,
        "classifier_bias": False, "classifier_activation": "gelu", "classifier_pooling": cfg.classifier_pooling,
        "local_attention": cfg.local_attention, "global_attn_every_n_layers": cfg.global_attn_every_n_layers,
        "layer_types": types, "global_rope_theta": cfg.global_rope_theta, "local_rope_theta": cfg.local_rope_theta,
        "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": cfg.global_rope_theta},
                            "sliding_attention": {"rope_type": "default", "rope_theta": cfg.local_rope_theta}},
        "tie_word_embeddings": True, **token_ids_to_hf(cfg),
        "id2label": {str(i): f"LABEL_{i}" for i in range(cfg.num_labels)},
        "label2id": {f"LABEL_{i}": i for i in range(cfg.num_labels)},
    }


def weights(cfg: ModernBertConfig) -> list[Rule]:
    d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    b = "" if cfg.head == "model" else "model."
    qkv = lambda zoo: tuple(f"{zoo}/attn/{x}_proj/kernel" for x in "qkv")
    mlp = lambda zoo: (f"{zoo}/mlp/gate_proj/kernel", f"{zoo}/mlp/up_proj/kernel")
    rules = [Rule(b + "embeddings.tok_embeddings.weight", ("tok_embeddings/embedding",), "copy", (v, d)),
             Rule(b + "embeddings.norm.weight", ("embed_norm/scale",), "copy", (d,)),
             Rule(b + "final_norm.weight", ("final_norm/scale",), "copy", (d,))]
    for zoo, stack in (("first_layer", ()), ("layers", (("i", cfg.num_layers - 1, 1),))):
        if zoo == "layers" and cfg.num_layers == 1:
            continue
        x = b + ("layers.0." if not stack else "layers.{i}.")
        rules += [Rule(x + "attn.Wqkv.weight", qkv(zoo), "fused_linear", (3 * d, d), stack),
                  Rule(x + "attn.Wo.weight", (f"{zoo}/attn/o_proj/kernel",), "linear", (d, d), stack),
                  Rule(x + "mlp_norm.weight", (f"{zoo}/mlp_norm/scale",), "copy", (d,), stack),
                  Rule(x + "mlp.Wi.weight", mlp(zoo), "fused_linear", (2 * f, d), stack),
                  Rule(x + "mlp.Wo.weight", (f"{zoo}/mlp/down_proj/kernel",), "linear", (d, f), stack)]
        if stack:
            rules.append(Rule(x + "attn_norm.weight", ("layers/attn_norm/scale",), "copy", (d,), stack))
    if cfg.head != "model":
        rules += [Rule("head.dense.weight", ("head_dense/kernel",), "linear", (d, d)),
                  Rule("head.norm.weight", ("head_norm/scale",), "copy", (d,))]
    if cfg.head == "mlm":
        rules.append(Rule("decoder.bias", ("decoder_bias",), "copy", (v,)))
    if cfg.head == "classify":
        rules += [Rule("classifier.weight", ("classifier/kernel",), "linear", (cfg.num_labels, d)),
                  Rule("classifier.bias", ("classifier/bias",), "copy", (cfg.num_labels,))]
    return rules


def spec(arch: str) -> ArchSpec:
    prefix = "" if arch == "ModernBertModel" else "model."
    backbone = ("embeddings.", "layers.", "final_norm.")

    def normalize(key: str) -> str:
        if not prefix:
            return key[len("model."):] if key.startswith("model.") else key
        return prefix + key if key.startswith(backbone) else key

    ignore = [r"^head\.", r"^decoder\.", r"^classifier\."] if arch == "ModernBertModel" else []
    if arch == "ModernBertForMaskedLM":
        ignore.append(r"^classifier\.")
    if arch == "ModernBertForSequenceClassification":
        ignore.append(r"^decoder\.")
    tied = {"decoder.weight": "model.embeddings.tok_embeddings.weight"} if arch == "ModernBertForMaskedLM" else {}
    return ArchSpec(config_from_hf=lambda hf, name: config_from_hf(hf, name, arch), config_to_hf=config_to_hf,
                    weights=weights, ignore=tuple(ignore), tied=lambda cfg: tied, normalize_key=normalize)


ARCHITECTURES: dict[str, ArchSpec] = {arch: spec(arch) for arch in ModernBertConfig.ARCHITECTURES}
