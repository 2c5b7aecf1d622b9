"""Hugging Face <-> zoo tables for the encoder families: BERT (BertModel,
BertForMaskedLM, BertForSequenceClassification) and T5ForConditionalGeneration.

Same machinery as the decoders in `zoo/hf.py` (one `ArchSpec` per HF class, `Rule`s
with exact invertible layouts). This module adds its specs to `zoo.hf.ARCHITECTURES`
when imported, and `zoo/hf.py` imports it last, so either import order registers them. Two layout facts drive the tables:
  * HF nests BERT under `bert.` in the head classes but not in BertModel; keys are
    normalised to the class's own spelling, so either kind of checkpoint loads.
  * T5 keeps each stack's relative-attention table in block 0 only; the zoo keeps it
    beside the scanned layers (`encoder/relative_attention_bias`), unstacked.
"""

from __future__ import annotations

from zoo.configs import BertConfig, T5Config
from zoo.hf import ARCHITECTURES, ArchSpec, CheckpointError, Rule, _token_ids_from_hf


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise CheckpointError(message)


# --- BERT ------------------------------------------------------------------------------

def _bert_config_from_hf(hf: dict, name: str, arch: str) -> BertConfig:
    act = hf.get("hidden_act", "gelu")
    _require(act == "gelu", f"{arch}: hidden_act {act!r} is not supported (only exact-erf 'gelu')")
    pos = hf.get("position_embedding_type", "absolute")
    _require(pos == "absolute", f"{arch}: position_embedding_type {pos!r} is not supported (only 'absolute')")
    _require(not hf.get("is_decoder", False) and not hf.get("add_cross_attention", False),
             f"{arch}: decoder BERT (is_decoder / add_cross_attention) is not supported")
    num_labels = len(hf["id2label"]) if hf.get("id2label") else hf.get("num_labels", 2)
    vocab = hf.get("vocab_size", 30522)
    return BertConfig(
        name=name, architecture=arch, vocab_size=vocab, hidden_size=hf.get("hidden_size", 768),
        num_layers=hf.get("num_hidden_layers", 12), num_heads=hf.get("num_attention_heads", 12),
        intermediate_size=hf.get("intermediate_size", 3072), max_seq_len=hf.get("max_position_embeddings", 512),
        type_vocab_size=hf.get("type_vocab_size", 2), layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
        num_labels=num_labels, mask_token_id=min(103, vocab - 1), **_token_ids_from_hf(hf, arch),
    )


def _bert_config_to_hf(cfg: BertConfig) -> dict:
    _require(cfg.head_dim * cfg.num_heads == cfg.hidden_size,
             f"{cfg.name}: BERT needs head_dim * num_heads == hidden_size")
    out = {
        "architectures": [cfg.architecture], "model_type": "bert",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "intermediate_size": cfg.intermediate_size, "hidden_act": "gelu",
        "max_position_embeddings": cfg.max_seq_len, "type_vocab_size": cfg.type_vocab_size,
        "layer_norm_eps": cfg.layer_norm_eps, "pad_token_id": cfg.pad_token_id,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
        "position_embedding_type": "absolute", "is_decoder": False, "add_cross_attention": False,
        "tie_word_embeddings": True,
        # Every HF config carries the label maps; only the classifier head uses them.
        "id2label": {str(i): f"LABEL_{i}" for i in range(cfg.num_labels)},
        "label2id": {f"LABEL_{i}": i for i in range(cfg.num_labels)},
    }
    return out


def _bert_prefix(cfg: BertConfig) -> str:
    return "" if cfg.architecture == "BertModel" else "bert."


def _bert_weights(cfg: BertConfig) -> list[Rule]:
    d, f, v, n, h = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_heads, cfg.head_dim
    L = (("i", cfg.num_layers),)
    b = _bert_prefix(cfg)
    e, x = b + "embeddings.", b + "encoder.layer.{i}."
    rules = [
        Rule(e + "word_embeddings.weight", ("word_embeddings/embedding",), "copy", (v, d)),
        Rule(e + "position_embeddings.weight", ("position_embeddings/embedding",), "copy", (cfg.max_seq_len, d)),
        Rule(e + "token_type_embeddings.weight", ("token_type_embeddings/embedding",), "copy",
             (cfg.type_vocab_size, d)),
        Rule(e + "LayerNorm.weight", ("embed_norm/scale",), "copy", (d,)),
        Rule(e + "LayerNorm.bias", ("embed_norm/bias",), "copy", (d,)),
    ]
    for hf_name, zoo_name in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
        rules += [Rule(x + f"attention.self.{hf_name}.weight", (f"layers/attn/{zoo_name}/kernel",), "linear",
                       (n * h, d), L),
                  Rule(x + f"attention.self.{hf_name}.bias", (f"layers/attn/{zoo_name}/bias",), "copy", (n * h,), L)]
    rules += [
        Rule(x + "attention.output.dense.weight", ("layers/attn/o_proj/kernel",), "linear", (d, n * h), L),
        Rule(x + "attention.output.dense.bias", ("layers/attn/o_proj/bias",), "copy", (d,), L),
        Rule(x + "attention.output.LayerNorm.weight", ("layers/attn_norm/scale",), "copy", (d,), L),
        Rule(x + "attention.output.LayerNorm.bias", ("layers/attn_norm/bias",), "copy", (d,), L),
        Rule(x + "intermediate.dense.weight", ("layers/mlp/fc_in/kernel",), "linear", (f, d), L),
        Rule(x + "intermediate.dense.bias", ("layers/mlp/fc_in/bias",), "copy", (f,), L),
        Rule(x + "output.dense.weight", ("layers/mlp/fc_out/kernel",), "linear", (d, f), L),
        Rule(x + "output.dense.bias", ("layers/mlp/fc_out/bias",), "copy", (d,), L),
        Rule(x + "output.LayerNorm.weight", ("layers/mlp_norm/scale",), "copy", (d,), L),
        Rule(x + "output.LayerNorm.bias", ("layers/mlp_norm/bias",), "copy", (d,), L),
    ]
    if cfg.architecture == "BertForMaskedLM":
        p = "cls.predictions."
        rules += [
            Rule(p + "transform.dense.weight", ("mlm_dense/kernel",), "linear", (d, d)),
            Rule(p + "transform.dense.bias", ("mlm_dense/bias",), "copy", (d,)),
            Rule(p + "transform.LayerNorm.weight", ("mlm_norm/scale",), "copy", (d,)),
            Rule(p + "transform.LayerNorm.bias", ("mlm_norm/bias",), "copy", (d,)),
            Rule(p + "bias", ("mlm_bias",), "copy", (v,)),
        ]
    else:
        rules += [Rule(b + "pooler.dense.weight", ("pooler/kernel",), "linear", (d, d)),
                  Rule(b + "pooler.dense.bias", ("pooler/bias",), "copy", (d,))]
    if cfg.architecture == "BertForSequenceClassification":
        rules += [Rule("classifier.weight", ("classifier/kernel",), "linear", (cfg.num_labels, d)),
                  Rule("classifier.bias", ("classifier/bias",), "copy", (cfg.num_labels,))]
    return rules


def _bert_normalize_key(arch: str):
    """BertModel checkpoints are unprefixed, the heads' backbone lives under `bert.`;
    a checkpoint of the other kind is renamed to this class's spelling."""
    backbone = ("embeddings.", "encoder.", "pooler.")

    def normalize(key: str) -> str:
        key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        if arch == "BertModel":
            return key[len("bert."):] if key.startswith("bert.") else key
        return "bert." + key if key.startswith(backbone) else key

    return normalize


def _bert_spec(arch: str) -> ArchSpec:
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
        config_from_hf=lambda hf, name: _bert_config_from_hf(hf, name, arch),
        config_to_hf=_bert_config_to_hf, weights=_bert_weights, ignore=tuple(ignore),
        tied=lambda cfg: tied, normalize_key=_bert_normalize_key(arch),
    )


# --- T5 --------------------------------------------------------------------------------

def _t5_config_from_hf(hf: dict, name: str) -> T5Config:
    arch = "T5ForConditionalGeneration"
    ff = hf.get("feed_forward_proj", "relu")
    _require(ff in T5Config.FEED_FORWARD,
             f"{arch}: feed_forward_proj {ff!r} is not supported (supported: {', '.join(T5Config.FEED_FORWARD)})")
    tie = bool(hf.get("tie_word_embeddings", True))
    scale = hf.get("scale_decoder_outputs")
    return T5Config(
        name=name, vocab_size=hf.get("vocab_size", 32128), hidden_size=hf.get("d_model", 512),
        head_dim=hf.get("d_kv", 64), intermediate_size=hf.get("d_ff", 2048), num_layers=hf.get("num_layers", 6),
        num_decoder_layers=hf.get("num_decoder_layers") or hf.get("num_layers", 6),
        num_heads=hf.get("num_heads", 8),
        relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
        layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-6), feed_forward_proj=ff, tie_word_embeddings=tie,
        scale_decoder_outputs=tie if scale is None else bool(scale),
        # T5's model code needs int pad and eos ids; HF's T5 config has no bos (kept if there).
        pad_token_id=hf.get("pad_token_id") or 0, eos_token_id=hf.get("eos_token_id", 1),
        bos_token_id=hf.get("bos_token_id"),
        decoder_start_token_id=hf.get("decoder_start_token_id") or 0,
        max_seq_len=hf.get("n_positions", 512),
        first_sentinel_id=32099 if hf.get("vocab_size") == 32128 else 0,
    )


def _t5_config_to_hf(cfg: T5Config) -> dict:
    bos = {} if cfg.bos_token_id is None else {"bos_token_id": cfg.bos_token_id}
    return {
        "architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "is_encoder_decoder": True,
        "vocab_size": cfg.vocab_size, "d_model": cfg.hidden_size, "d_kv": cfg.head_dim,
        "d_ff": cfg.intermediate_size, "num_layers": cfg.num_layers, "num_decoder_layers": cfg.num_decoder_layers,
        "num_heads": cfg.num_heads, "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
        "relative_attention_max_distance": cfg.relative_attention_max_distance,
        "layer_norm_epsilon": cfg.layer_norm_epsilon, "feed_forward_proj": cfg.feed_forward_proj,
        # transformers>=5 reads scale_decoder_outputs; older versions derive it from the tie.
        "tie_word_embeddings": cfg.tie_word_embeddings, "scale_decoder_outputs": cfg.scale_decoder_outputs,
        "pad_token_id": cfg.pad_token_id, "eos_token_id": cfg.eos_token_id,
        "decoder_start_token_id": cfg.decoder_start_token_id, "n_positions": cfg.max_seq_len, **bos,
    }


def _t5_weights(cfg: T5Config) -> list[Rule]:
    d, f, v, n, h = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_heads, cfg.head_dim
    rules = [Rule("shared.weight", ("shared/embedding",), "copy", (v, d))]

    def attention(hf: str, zoo: str, stack) -> list[Rule]:
        return [Rule(f"{hf}.{x}.weight", (f"{zoo}/{x}_proj/kernel",), "linear", (n * h, d), stack) for x in "qkv"] + [
            Rule(f"{hf}.o.weight", (f"{zoo}/o_proj/kernel",), "linear", (d, n * h), stack)]

    def mlp(hf: str, zoo: str, stack) -> list[Rule]:
        if cfg.feed_forward_proj == "gated-gelu":
            pairs = (("wi_0", "gate_proj", (f, d)), ("wi_1", "up_proj", (f, d)), ("wo", "down_proj", (d, f)))
        else:
            pairs = (("wi", "fc_in", (f, d)), ("wo", "fc_out", (d, f)))
        return [Rule(f"{hf}.DenseReluDense.{a}.weight", (f"{zoo}/{b}/kernel",), "linear", s, stack)
                for a, b, s in pairs]

    for stack, depth, sublayers in (("encoder", cfg.num_layers, ("self_attn", "mlp")),
                                    ("decoder", cfg.num_decoder_layers, ("self_attn", "cross_attn", "mlp"))):
        L = (("i", depth),)
        rules.append(Rule(f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                          (f"{stack}/relative_attention_bias",), "copy", (cfg.relative_attention_num_buckets, n)))
        for j, sub in enumerate(sublayers):
            hf, zoo = f"{stack}.block.{{i}}.layer.{j}", f"{stack}/layers/{sub}"
            rules.append(Rule(f"{hf}.layer_norm.weight", (f"{zoo}_norm/scale",), "copy", (d,), L))
            if sub == "mlp":
                rules += mlp(hf, zoo, L)
            else:
                rules += attention(f"{hf}.{'EncDecAttention' if sub == 'cross_attn' else 'SelfAttention'}", zoo, L)
        rules.append(Rule(f"{stack}.final_layer_norm.weight", (f"{stack}/final_norm/scale",), "copy", (d,)))
    if not cfg.tie_word_embeddings:
        rules.append(Rule("lm_head.weight", ("lm_head/kernel",), "linear", (v, d)))
    return rules


def _t5_tied(cfg: T5Config) -> dict[str, str]:
    tied = {"encoder.embed_tokens.weight": "shared.weight", "decoder.embed_tokens.weight": "shared.weight"}
    if cfg.tie_word_embeddings:
        tied["lm_head.weight"] = "shared.weight"
    return tied


T5_SPEC = ArchSpec(config_from_hf=_t5_config_from_hf, config_to_hf=_t5_config_to_hf, weights=_t5_weights,
                   tied=_t5_tied)

ENCODER_ARCHITECTURES: dict[str, ArchSpec] = {
    **{arch: _bert_spec(arch) for arch in BertConfig.ARCHITECTURES},
    "T5ForConditionalGeneration": T5_SPEC,
}

ARCHITECTURES.update(ENCODER_ARCHITECTURES)
