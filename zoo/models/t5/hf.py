"""{T5,MT5,UMT5}ForConditionalGeneration <-> zoo T5: config translation and weight table
(zoo.hf.rules).

T5 and mT5 keep each stack's relative-attention table in block 0 only; the zoo keeps it
beside the scanned layers (`encoder/relative_attention_bias`), unstacked. UMT5 has one
per block, stacked in the zoo (`encoder/layers/self_attn/relative_attention_bias`).
"""

from __future__ import annotations

from zoo.hf.rules import ArchSpec, Rule, require
from zoo.models.t5.config import T5Config

MODEL_TYPES = {"T5ForConditionalGeneration": "t5", "MT5ForConditionalGeneration": "mt5",
               "UMT5ForConditionalGeneration": "umt5"}
# transformers' config defaults where config.json leaves feed_forward_proj out
_DEFAULT_FF = {"T5ForConditionalGeneration": "relu", "MT5ForConditionalGeneration": "gated-gelu",
               "UMT5ForConditionalGeneration": "gated-gelu"}
_SENTINELS = {32128: 32099, 250112: 250099}  # vocab size -> <extra_id_0> of T5's and mT5's tokenizers


def config_from_hf(hf: dict, name: str, arch: str = "T5ForConditionalGeneration") -> T5Config:
    ff = hf.get("feed_forward_proj", _DEFAULT_FF[arch])
    require(ff in T5Config.FEED_FORWARD,
            f"{arch}: feed_forward_proj {ff!r} is not supported (supported: {', '.join(T5Config.FEED_FORWARD)})")
    tie = bool(hf.get("tie_word_embeddings", True))
    scale = hf.get("scale_decoder_outputs")
    if arch == "MT5ForConditionalGeneration":  # MT5's model code never scales, whatever the config says
        scale = False
    return T5Config(
        name=name, architecture=arch, vocab_size=hf.get("vocab_size", 32128), hidden_size=hf.get("d_model", 512),
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
        first_sentinel_id=_SENTINELS.get(hf.get("vocab_size"), 0),
    )


def config_to_hf(cfg: T5Config) -> dict:
    bos = {} if cfg.bos_token_id is None else {"bos_token_id": cfg.bos_token_id}
    return {
        "architectures": [cfg.architecture], "model_type": MODEL_TYPES[cfg.architecture], "is_encoder_decoder": True,
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


def weights(cfg: T5Config) -> list[Rule]:
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
        table = f"{stack}.block.{{i}}.layer.0.SelfAttention.relative_attention_bias.weight"
        if cfg.relative_bias_per_layer:
            rules.append(Rule(table, (f"{stack}/layers/self_attn/relative_attention_bias",), "copy",
                              (cfg.relative_attention_num_buckets, n), L))
        else:
            rules.append(Rule(table.format(i=0), (f"{stack}/relative_attention_bias",), "copy",
                              (cfg.relative_attention_num_buckets, n)))
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


def tied(cfg: T5Config) -> dict[str, str]:
    tied = {"encoder.embed_tokens.weight": "shared.weight", "decoder.embed_tokens.weight": "shared.weight"}
    if cfg.tie_word_embeddings:
        tied["lm_head.weight"] = "shared.weight"
    return tied


def _spec(arch: str) -> ArchSpec:
    # HF's legacy key for a cross-attention table that no T5 model uses
    ignore = (r"^decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight$",)
    return ArchSpec(config_from_hf=lambda hf, name: config_from_hf(hf, name, arch), config_to_hf=config_to_hf,
                    weights=weights, tied=tied, ignore=ignore)


ARCHITECTURES: dict[str, ArchSpec] = {arch: _spec(arch) for arch in T5Config.ARCHITECTURES}
