"""BertModel, BertForMaskedLM and BertForSequenceClassification <-> zoo BERT: config
translation and weight table (zoo.hf.rules).

HF nests BERT under `bert.` in the head classes but not in BertModel; keys are
normalised to the class's own spelling, so either kind of checkpoint loads.
"""

from __future__ import annotations

from zoo.hf.rules import ArchSpec, Rule, dense, layer_norm, require, token_ids_from_hf, token_ids_to_hf
from zoo.models.bert.config import BertConfig


def config_from_hf(hf: dict, name: str, arch: str) -> BertConfig:
    act = hf.get("hidden_act", "gelu")
    require(act == "gelu", f"{arch}: hidden_act {act!r} is not supported (only exact-erf 'gelu')")
    pos = hf.get("position_embedding_type", "absolute")
    require(pos == "absolute", f"{arch}: position_embedding_type {pos!r} is not supported (only 'absolute')")
    require(not hf.get("is_decoder", False) and not hf.get("add_cross_attention", False),
            f"{arch}: decoder BERT (is_decoder / add_cross_attention) is not supported")
    num_labels = len(hf["id2label"]) if hf.get("id2label") else hf.get("num_labels", 2)
    vocab = hf.get("vocab_size", 30522)
    return BertConfig(
        name=name, architecture=arch, vocab_size=vocab, hidden_size=hf.get("hidden_size", 768),
        num_layers=hf.get("num_hidden_layers", 12), num_heads=hf.get("num_attention_heads", 12),
        intermediate_size=hf.get("intermediate_size", 3072), max_seq_len=hf.get("max_position_embeddings", 512),
        type_vocab_size=hf.get("type_vocab_size", 2), layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
        num_labels=num_labels, mask_token_id=min(103, vocab - 1), **token_ids_from_hf(hf, (None, None, 0)),
    )


def config_to_hf(cfg: BertConfig) -> dict:
    require(cfg.head_dim * cfg.num_heads == cfg.hidden_size,
            f"{cfg.name}: BERT needs head_dim * num_heads == hidden_size")
    return {
        "architectures": [cfg.architecture], "model_type": "bert",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "intermediate_size": cfg.intermediate_size, "hidden_act": "gelu",
        "max_position_embeddings": cfg.max_seq_len, "type_vocab_size": cfg.type_vocab_size,
        "layer_norm_eps": cfg.layer_norm_eps, **token_ids_to_hf(cfg),
        "position_embedding_type": "absolute", "is_decoder": False, "add_cross_attention": False,
        "tie_word_embeddings": True,
        # Every HF config carries the label maps; only the classifier head uses them.
        "id2label": {str(i): f"LABEL_{i}" for i in range(cfg.num_labels)},
        "label2id": {f"LABEL_{i}": i for i in range(cfg.num_labels)},
    }


def _prefix(cfg: BertConfig) -> str:
    return "" if cfg.architecture == "BertModel" else "bert."


def weights(cfg: BertConfig) -> list[Rule]:
    d, f, v, n, h = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_heads, cfg.head_dim
    L = (("i", cfg.num_layers),)
    b = _prefix(cfg)
    e, x = b + "embeddings.", b + "encoder.layer.{i}."
    rules = [
        Rule(e + "word_embeddings.weight", ("word_embeddings/embedding",), "copy", (v, d)),
        Rule(e + "position_embeddings.weight", ("position_embeddings/embedding",), "copy", (cfg.max_seq_len, d)),
        Rule(e + "token_type_embeddings.weight", ("token_type_embeddings/embedding",), "copy",
             (cfg.type_vocab_size, d)),
        *layer_norm(e + "LayerNorm", "embed_norm", d),
    ]
    for hf_name, zoo_name in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
        rules += dense(x + f"attention.self.{hf_name}", f"layers/attn/{zoo_name}", "linear", (n * h, d), L)
    rules += [
        *dense(x + "attention.output.dense", "layers/attn/o_proj", "linear", (d, n * h), L),
        *layer_norm(x + "attention.output.LayerNorm", "layers/attn_norm", d, L),
        *dense(x + "intermediate.dense", "layers/mlp/fc_in", "linear", (f, d), L),
        *dense(x + "output.dense", "layers/mlp/fc_out", "linear", (d, f), L),
        *layer_norm(x + "output.LayerNorm", "layers/mlp_norm", d, L),
    ]
    if cfg.architecture == "BertForMaskedLM":
        p = "cls.predictions."
        rules += [
            *dense(p + "transform.dense", "mlm_dense", "linear", (d, d)),
            *layer_norm(p + "transform.LayerNorm", "mlm_norm", d),
            Rule(p + "bias", ("mlm_bias",), "copy", (v,)),
        ]
    else:
        rules += dense(b + "pooler.dense", "pooler", "linear", (d, d))
    if cfg.architecture == "BertForSequenceClassification":
        rules += dense("classifier", "classifier", "linear", (cfg.num_labels, d))
    return rules


def normalize_key(arch: str):
    """BertModel checkpoints are unprefixed, the heads' backbone lives under `bert.`;
    a checkpoint of the other kind is renamed to this class's spelling."""
    backbone = ("embeddings.", "encoder.", "pooler.")

    def normalize(key: str) -> str:
        key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        if arch == "BertModel":
            return key[len("bert."):] if key.startswith("bert.") else key
        return "bert." + key if key.startswith(backbone) else key

    return normalize


def spec(arch: str) -> ArchSpec:
    # BertModel keeps the pooler; a BertModel checkpoint loaded into a head class (or a
    # head checkpoint into BertModel) has tensors the other side ignores.
    ignore = [r"embeddings\.position_ids$"]
    if arch == "BertModel":
        ignore += [r"^cls\.", r"^classifier\."]
    if arch == "BertForMaskedLM":
        ignore += [r"pooler\.", r"cls\.seq_relationship\."]
    tied = {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
            "cls.predictions.decoder.bias": "cls.predictions.bias"} if arch == "BertForMaskedLM" else {}
    return ArchSpec(
        config_from_hf=lambda hf, name: config_from_hf(hf, name, arch),
        config_to_hf=config_to_hf, weights=weights, ignore=tuple(ignore),
        tied=lambda cfg: tied, normalize_key=normalize_key(arch),
    )


ARCHITECTURES: dict[str, ArchSpec] = {arch: spec(arch) for arch in BertConfig.ARCHITECTURES}
