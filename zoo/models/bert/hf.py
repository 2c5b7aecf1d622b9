"""{Bert,Roberta,XLMRoberta}{Model,ForMaskedLM,ForSequenceClassification} <-> zoo BERT:
config translation and weight table (zoo.hf.rules).

HF nests the backbone under `bert.` / `roberta.` in the head classes but not in the
*Model classes; keys are normalised to the class's own spelling, so either kind of
checkpoint loads. RoBERTa's MLM head is `lm_head.*`, its classifier `classifier.dense`
(the zoo's pooler: tanh of a dense layer on the first token) + `classifier.out_proj`;
its max_position_embeddings counts the pad_token_id + 1 ids before the first position.
"""

from __future__ import annotations

from zoo.hf.rules import ArchSpec, Rule, dense, layer_norm, require, token_ids_from_hf, token_ids_to_hf
from zoo.models.bert.config import BertConfig

MODEL_TYPES = {"Bert": "bert", "Roberta": "roberta", "XLMRoberta": "xlm-roberta"}


def config_from_hf(hf: dict, name: str, arch: str) -> BertConfig:
    act = hf.get("hidden_act", "gelu")
    require(act == "gelu", f"{arch}: hidden_act {act!r} is not supported (only exact-erf 'gelu')")
    pos = hf.get("position_embedding_type", "absolute")
    require(pos == "absolute", f"{arch}: position_embedding_type {pos!r} is not supported (only 'absolute')")
    require(not hf.get("is_decoder", False) and not hf.get("add_cross_attention", False),
            f"{arch}: decoder BERT (is_decoder / add_cross_attention) is not supported")
    num_labels = len(hf["id2label"]) if hf.get("id2label") else hf.get("num_labels", 2)
    bert = arch.startswith("Bert")
    vocab = hf.get("vocab_size", 30522)
    # transformers' defaults where config.json leaves an id out (RobertaConfig: bos 0, eos 2, pad 1)
    ids = token_ids_from_hf(hf, (None, None, 0) if bert else (0, 2, 1))
    offset = 0 if bert else ids["pad_token_id"] + 1
    positions = hf.get("max_position_embeddings", 512)
    require(positions > offset, f"{arch}: max_position_embeddings {positions} leaves no position after the "
                                f"{offset} that pad_token_id={ids['pad_token_id']} reserves")
    return BertConfig(
        name=name, architecture=arch, vocab_size=vocab, hidden_size=hf.get("hidden_size", 768),
        num_layers=hf.get("num_hidden_layers", 12), num_heads=hf.get("num_attention_heads", 12),
        intermediate_size=hf.get("intermediate_size", 3072), max_seq_len=positions - offset,
        type_vocab_size=hf.get("type_vocab_size", 2), layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
        # BERT's uncased [MASK] is 103; RoBERTa's and XLM-R's <mask> is the last id
        num_labels=num_labels, mask_token_id=min(103, vocab - 1) if bert else vocab - 1, **ids,
    )


def config_to_hf(cfg: BertConfig) -> dict:
    require(cfg.head_dim * cfg.num_heads == cfg.hidden_size,
            f"{cfg.name}: BERT needs head_dim * num_heads == hidden_size")
    return {
        "architectures": [cfg.architecture], "model_type": MODEL_TYPES[cfg.backbone],
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "intermediate_size": cfg.intermediate_size, "hidden_act": "gelu",
        "max_position_embeddings": cfg.max_seq_len + cfg.position_offset, "type_vocab_size": cfg.type_vocab_size,
        "layer_norm_eps": cfg.layer_norm_eps, **token_ids_to_hf(cfg),
        "position_embedding_type": "absolute", "is_decoder": False, "add_cross_attention": False,
        "tie_word_embeddings": True,
        # Every HF config carries the label maps; only the classifier head uses them.
        "id2label": {str(i): f"LABEL_{i}" for i in range(cfg.num_labels)},
        "label2id": {f"LABEL_{i}": i for i in range(cfg.num_labels)},
    }


def _prefix(arch: str) -> str:
    """Where the backbone's tensors live in this class: "" (*Model), "bert." or "roberta."."""
    if arch.endswith("Model"):
        return ""
    return "bert." if arch.startswith("Bert") else "roberta."


def weights(cfg: BertConfig) -> list[Rule]:
    d, f, v, n, h = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_heads, cfg.head_dim
    L = (("i", cfg.num_layers),)
    b = _prefix(cfg.architecture)
    e, x = b + "embeddings.", b + "encoder.layer.{i}."
    rules = [
        Rule(e + "word_embeddings.weight", ("word_embeddings/embedding",), "copy", (v, d)),
        Rule(e + "position_embeddings.weight", ("position_embeddings/embedding",), "copy",
             (cfg.max_seq_len + cfg.position_offset, d)),
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
    bert = cfg.backbone == "Bert"
    if cfg.head == "mlm" and bert:
        p = "cls.predictions."
        rules += [
            *dense(p + "transform.dense", "mlm_dense", "linear", (d, d)),
            *layer_norm(p + "transform.LayerNorm", "mlm_norm", d),
            Rule(p + "bias", ("mlm_bias",), "copy", (v,)),
        ]
    elif cfg.head == "mlm":
        rules += [
            *dense("lm_head.dense", "mlm_dense", "linear", (d, d)),
            *layer_norm("lm_head.layer_norm", "mlm_norm", d),
            Rule("lm_head.bias", ("mlm_bias",), "copy", (v,)),
        ]
    elif cfg.head == "classify" and not bert:
        rules += [*dense("classifier.dense", "pooler", "linear", (d, d)),
                  *dense("classifier.out_proj", "classifier", "linear", (cfg.num_labels, d))]
    else:
        rules += dense(b + "pooler.dense", "pooler", "linear", (d, d))
    if cfg.head == "classify" and bert:
        rules += dense("classifier", "classifier", "linear", (cfg.num_labels, d))
    return rules


def normalize_key(arch: str):
    """*Model checkpoints are unprefixed, the heads' backbone lives under `bert.` or
    `roberta.`; a checkpoint of the other kind is renamed to this class's spelling."""
    backbone = ("embeddings.", "encoder.", "pooler.")
    prefix = "bert." if arch.startswith("Bert") else "roberta."

    def normalize(key: str) -> str:
        key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        if arch.endswith("Model"):
            return key[len(prefix):] if key.startswith(prefix) else key
        return prefix + key if key.startswith(backbone) else key

    return normalize


def spec(arch: str) -> ArchSpec:
    # *Model keeps the pooler; a *Model checkpoint loaded into a head class (or a
    # head checkpoint into *Model) has tensors the other side ignores.
    ignore = [r"embeddings\.position_ids$", r"embeddings\.token_type_ids$"]
    if arch.endswith("Model"):
        ignore += [r"^cls\.", r"^classifier\.", r"^lm_head\."]
    if arch.endswith("ForMaskedLM"):
        ignore += [r"pooler\.", r"cls\.seq_relationship\.", r"^classifier\."]
    if arch.endswith("ForSequenceClassification") and not arch.startswith("Bert"):
        ignore += [r"pooler\.", r"^lm_head\."]  # RoBERTa's classifier has its own dense layer
    tied = {}
    if arch == "BertForMaskedLM":
        tied = {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
                "cls.predictions.decoder.bias": "cls.predictions.bias"}
    elif arch.endswith("ForMaskedLM"):
        tied = {"lm_head.decoder.weight": "roberta.embeddings.word_embeddings.weight",
                "lm_head.decoder.bias": "lm_head.bias"}
    return ArchSpec(
        config_from_hf=lambda hf, name: config_from_hf(hf, name, arch),
        config_to_hf=config_to_hf, weights=weights, ignore=tuple(ignore),
        tied=lambda cfg: tied, normalize_key=normalize_key(arch),
    )


ARCHITECTURES: dict[str, ArchSpec] = {arch: spec(arch) for arch in BertConfig.ARCHITECTURES}
