"""Tiny random Hugging Face checkpoints built locally (no downloads), the inputs each model
kind takes, and the checks every family's checkpoints share (damaged tensors, atomic export).

The tables are plain data, importable without PyTorch; the functions that build or run a
PyTorch model import torch/transformers themselves and belong to tests marked `torch`.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

import zoo
import zoo.hf.convert
from zoo.hf.rules import CheckpointError
from zoo.paths import OutputError

VOCAB, HIDDEN, LAYERS, HEADS, FFN = 256, 64, 2, 4, 128

_COMMON = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
               intermediate_size=FFN, max_position_embeddings=128)
_MOE = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
            num_key_value_heads=2, max_position_embeddings=128, num_experts_per_tok=2)
_BERT = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
             intermediate_size=FFN, max_position_embeddings=64, type_vocab_size=3, num_labels=3)
# Few buckets and a short max_distance, so that short test sequences reach the logarithmic
# buckets; the decoder is deeper than the encoder to catch mix-ups.
_T5 = dict(vocab_size=VOCAB, d_model=HIDDEN, d_kv=16, d_ff=96, num_layers=2, num_decoder_layers=3, num_heads=HEADS,
           relative_attention_num_buckets=12, relative_attention_max_distance=20, decoder_start_token_id=0)
_MODERNBERT = dict(vocab_size=VOCAB + 3, hidden_size=HIDDEN, num_hidden_layers=4, num_attention_heads=HEADS,
                   intermediate_size=48, max_position_embeddings=64, global_attn_every_n_layers=3, local_attention=4,
                   global_rope_theta=1000.0, local_rope_theta=50.0, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                   cls_token_id=1, sep_token_id=2, num_labels=3)
# Llama 4: chunks of 5 (shorter than the test sequences), a temperature that bites early (floor 4,
# scale 0.5), GQA 2, Llama 3 rope scaling with low == high frequency factor, odd vocabulary
_LLAMA4 = dict(vocab_size=VOCAB + 3, hidden_size=HIDDEN, num_hidden_layers=4, num_attention_heads=HEADS,
               num_key_value_heads=2, head_dim=16, intermediate_size=48, intermediate_size_mlp=96, num_local_experts=4,
               max_position_embeddings=128, attention_chunk_size=5, floor_scale=4, attn_scale=0.5, bos_token_id=1,
               eos_token_id=2, pad_token_id=0,
               rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=16.0, low_freq_factor=1.0,
                                    high_freq_factor=1.0, original_max_position_embeddings=16))
# DeepSeek: MLA (q/k head 20 = 12 + 8, v head 16), one dense layer then two MoE layers of 12
# experts in 4 groups of 3 (2 groups kept: 6 eligible for the top-3), YaRN over 16 positions with
# mscale_all_dim (softmax scale) and, for V3, mscale != mscale_all_dim (cos/sin factor 1.025)
_DEEPSEEK = dict(vocab_size=VOCAB + 3, hidden_size=HIDDEN, num_hidden_layers=3, first_k_dense_replace=1,
                 num_attention_heads=HEADS, num_key_value_heads=HEADS, intermediate_size=96, n_routed_experts=12,
                 num_experts_per_tok=3, n_group=4, topk_group=2, kv_lora_rank=16, qk_nope_head_dim=12,
                 qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
                 pad_token_id=0)
_MODERNBERT_KEY = "layers.2.attn.Wqkv.weight"
_DECODER_KEY = "model.layers.1.self_attn.k_proj.weight"  # [K*H, D] = [32, 64]
_BERT_KEY = "encoder.layer.1.attention.self.key.weight"


@dataclass(frozen=True)
class Checkpoint:
    """How to build one tiny HF checkpoint: the transformers class `arch` (config.json's
    `architectures`) from `config` (a transformers config class name) with `kwargs`."""

    arch: str
    config: str
    kwargs: dict = field(default_factory=dict)
    damage_key: str = _DECODER_KEY  # the tensor the damaged-checkpoint checks break
    matrix_std: float = 0.08  # std of the redrawn weights with 2+ axes
    norm_base: float = 1.0  # where 1-D weights (norm scales) are centred; 0 for Gemma's (1 + w)
    untie: bool = False  # give T5 its own lm_head (transformers 5 always ties), as Flan-T5 has
    not_exported: tuple[str, ...] = ()  # buffers a checkpoint may hold that the export leaves out
    token_types: bool = True  # an encoder that takes token_type_ids (ModernBERT does not)
    # Outputs at padded positions are compared too (BERT's padded queries see the real tokens).
    # ModernBERT's local layers can leave a padded query no key at all: the zoo gives zeros, HF's
    # eager softmax over all-minimum logits averages every value; neither means anything.
    padded_outputs_compared: bool = True
    buffers: tuple[str, ...] = ()  # buffers redrawn too (names ending so): DeepSeek-V3's router correction bias


# name -> checkpoint. Every HF architecture in zoo.registry has at least one; each variant
# exercises its family's switches (sliding window, qkv bias, qk norm, T5 v1.0/v1.1, heads).
CHECKPOINTS: dict[str, Checkpoint] = {
    "gpt2": Checkpoint("GPT2LMHeadModel", "GPT2Config",
                       dict(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=128,
                            bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1),
                       damage_key="transformer.h.1.attn.c_attn.weight"),
    "llama": Checkpoint("LlamaForCausalLM", "LlamaConfig",
                        dict(**_COMMON, num_key_value_heads=2, rope_theta=500000.0,
                             rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                               high_freq_factor=4.0, original_max_position_embeddings=16))),
    "mistral": Checkpoint("MistralForCausalLM", "MistralConfig", dict(**_COMMON, num_key_value_heads=2,
                                                                      sliding_window=4)),
    "qwen2": Checkpoint("Qwen2ForCausalLM", "Qwen2Config", dict(**_COMMON, num_key_value_heads=2,
                                                                tie_word_embeddings=True)),
    "qwen3": Checkpoint("Qwen3ForCausalLM", "Qwen3Config", dict(**_COMMON, num_key_value_heads=2, head_dim=32)),
    "gemma": Checkpoint("GemmaForCausalLM", "GemmaConfig", dict(**_COMMON, num_key_value_heads=1, head_dim=32),
                        norm_base=0.0),
    # Odd vocabulary (not a multiple of 8), GQA 2, windows shorter than the test sequences,
    # caps small enough to bite; Gemma 3: two local layers then a global one with linear RoPE scaling.
    "gemma2": Checkpoint("Gemma2ForCausalLM", "Gemma2Config",
                         dict(**{**_COMMON, "vocab_size": VOCAB + 3, "num_hidden_layers": 3}, num_key_value_heads=2,
                              head_dim=16, query_pre_attn_scalar=20, sliding_window=4, attn_logit_softcapping=2.0,
                              final_logit_softcapping=3.0),
                         norm_base=0.0),
    "gemma3": Checkpoint("Gemma3ForCausalLM", "Gemma3TextConfig",
                         dict(**{**_COMMON, "vocab_size": VOCAB + 3, "num_hidden_layers": 3}, num_key_value_heads=1,
                              head_dim=32, query_pre_attn_scalar=24, sliding_window=5,
                              layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                              rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0,
                                                                  "rope_theta": 1000000.0},
                                               "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}}),
                         norm_base=0.0),
    "olmo2": Checkpoint("Olmo2ForCausalLM", "Olmo2Config", dict(**{**_COMMON, "vocab_size": VOCAB + 5},
                                                                num_key_value_heads=4)),
    # NoPE on layers 1 and 3 (HF's no_rope_layers says 1 where a layer HAS RoPE), GQA 4
    "smollm3": Checkpoint("SmolLM3ForCausalLM", "SmolLM3Config",
                          dict(**{**_COMMON, "num_hidden_layers": 4}, num_key_value_heads=1,
                               no_rope_layers=[1, 0, 1, 0], tie_word_embeddings=False, bos_token_id=1,
                               eos_token_id=2, pad_token_id=0)),
    # fused qkv_proj (GQA 2: unequal parts) and gate_up_proj; every layer windowed
    "phi3": Checkpoint("Phi3ForCausalLM", "Phi3Config", dict(**_COMMON, num_key_value_heads=2, sliding_window=5,
                                                             pad_token_id=0, bos_token_id=1, eos_token_id=2),
                       damage_key="model.layers.1.self_attn.qkv_proj.weight"),
    # GPT-OSS: sinks, biases everywhere, YaRN over 16 original positions, sliding (4) / full layers,
    # GQA 4, a SwiGLU limit low enough to clamp, odd vocabulary
    "gpt_oss": Checkpoint("GptOssForCausalLM", "GptOssConfig",
                          dict(**{**_MOE, "vocab_size": VOCAB + 3, "num_hidden_layers": 3, "num_key_value_heads": 1},
                               intermediate_size=48, num_local_experts=4, head_dim=16, sliding_window=4,
                               swiglu_limit=0.6, tie_word_embeddings=False,
                               rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                "beta_fast": 8.0, "beta_slow": 1.0,
                                                "original_max_position_embeddings": 16, "truncate": False})),
    # Phi-3.5 / Phi-4-mini style: LongRoPE (short factors up to 16 positions, long beyond) on half of
    # each head (partial_rotary_factor 0.5: 8 of 16 dims)
    "phi3-longrope": Checkpoint("Phi3ForCausalLM", "Phi3Config",
                                dict(**_COMMON, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                     original_max_position_embeddings=16,
                                     rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                                      "partial_rotary_factor": 0.5,
                                                      "short_factor": [1.0, 1.3, 2.1, 3.7],
                                                      "long_factor": [1.5, 4.0, 9.0, 17.0]}),
                                damage_key="model.layers.1.self_attn.qkv_proj.weight"),
    # Scout-like: every layer routed (top-1), layers 0-2 RoPE + chunked + QK L2 norm, layer 3 NoPE +
    # full attention + temperature
    "llama4": Checkpoint("Llama4ForCausalLM", "Llama4TextConfig", dict(**_LLAMA4, num_experts_per_tok=1)),
    # Maverick-like: layers 1 and 3 routed (top-2), 0 and 2 dense; one NoPE and one RoPE layer at each
    # scanned position; no QK norm
    "llama4-maverick": Checkpoint("Llama4ForCausalLM", "Llama4TextConfig",
                                  dict(**_LLAMA4, num_experts_per_tok=2, interleave_moe_layer_step=2,
                                       use_qk_norm=False, no_rope_layers=[0, 1, 1, 0])),
    "deepseek_v3": Checkpoint("DeepseekV3ForCausalLM", "DeepseekV3Config",
                              dict(**_DEEPSEEK, moe_intermediate_size=32, n_shared_experts=2, norm_topk_prob=True,
                                   routed_scaling_factor=2.5, q_lora_rank=24,
                                   rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                                        original_max_position_embeddings=16, beta_fast=8.0,
                                                        beta_slow=1.0, mscale=1.0, mscale_all_dim=0.8)),
                              damage_key="model.layers.1.self_attn.kv_b_proj.weight",
                              buffers=("e_score_correction_bias",)),
    # V2-Lite style: a full q projection, softmax with group-limited greedy choice, unnormalised
    "deepseek_v2": Checkpoint("DeepseekV2ForCausalLM", "DeepseekV2Config",
                              dict(**_DEEPSEEK, moe_intermediate_size=24, n_shared_experts=2,
                                   topk_method="group_limited_greedy", routed_scaling_factor=1.5, q_lora_rank=None,
                                   rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                                        original_max_position_embeddings=16, beta_fast=8.0,
                                                        beta_slow=1.0, mscale=0.707, mscale_all_dim=0.707)),
                              damage_key="model.layers.1.self_attn.kv_b_proj.weight"),
    "mixtral": Checkpoint("MixtralForCausalLM", "MixtralConfig",
                          dict(**_MOE, intermediate_size=96, num_local_experts=4)),
    # HF's default norm_topk_prob=False: the kept probabilities are not renormalised
    "qwen3_moe": Checkpoint("Qwen3MoeForCausalLM", "Qwen3MoeConfig",
                            dict(**_MOE, intermediate_size=128, moe_intermediate_size=48, num_experts=4,
                                 head_dim=32)),
    "bert": Checkpoint("BertModel", "BertConfig", _BERT, damage_key=_BERT_KEY,
                       not_exported=("embeddings.position_ids",)),
    "bert-mlm": Checkpoint("BertForMaskedLM", "BertConfig", _BERT, damage_key="bert." + _BERT_KEY,
                           not_exported=("bert.embeddings.position_ids",)),
    "bert-cls": Checkpoint("BertForSequenceClassification", "BertConfig", _BERT, damage_key="bert." + _BERT_KEY,
                           not_exported=("bert.embeddings.position_ids",)),
    # RoBERTa / XLM-R: positions from pad_token_id + 1 (pad 1: max_position_embeddings 66 = 64 positions)
    **{name: Checkpoint(arch, config, {**_BERT, "max_position_embeddings": 66}, damage_key=prefix + _BERT_KEY)
       for backbone, config in (("roberta", "RobertaConfig"), ("xlmr", "XLMRobertaConfig"))
       for name, arch, prefix in ((backbone, f"{config[:-6]}Model", ""),
                                  (f"{backbone}-mlm", f"{config[:-6]}ForMaskedLM", "roberta."),
                                  (f"{backbone}-cls", f"{config[:-6]}ForSequenceClassification", "roberta."))},
    # ModernBERT: 4 layers (global, local, local, global), windows of 2 each way, two RoPE bases,
    # odd vocabulary; the classifier pools the mean over real tokens
    **{name: Checkpoint(arch, "ModernBertConfig", dict(**_MODERNBERT, **extra), damage_key=prefix + _MODERNBERT_KEY,
                        token_types=False, padded_outputs_compared=False)
       for name, arch, prefix, extra in (
           ("modernbert", "ModernBertModel", "", {}),
           ("modernbert-mlm", "ModernBertForMaskedLM", "model.", {}),
           ("modernbert-cls", "ModernBertForSequenceClassification", "model.", {"classifier_pooling": "mean"}))},
    "t5-v1.0": Checkpoint("T5ForConditionalGeneration", "T5Config",
                          dict(**_T5, feed_forward_proj="relu", tie_word_embeddings=True),
                          damage_key="decoder.block.2.layer.1.EncDecAttention.k.weight", matrix_std=0.15),
    # tied but unscaled, as transformers 5 saves v1.1 models
    "t5-v1.1": Checkpoint("T5ForConditionalGeneration", "T5Config",
                          dict(**_T5, feed_forward_proj="gated-gelu", tie_word_embeddings=False),
                          damage_key="decoder.block.2.layer.1.EncDecAttention.k.weight", matrix_std=0.15),
    "t5-v1.1-untied": Checkpoint("T5ForConditionalGeneration", "T5Config",
                                 dict(**_T5, feed_forward_proj="gated-gelu", tie_word_embeddings=False),
                                 damage_key="decoder.block.2.layer.1.EncDecAttention.k.weight", matrix_std=0.15,
                                 untie=True),
    # mT5 (never scales the decoder output, even tied) and UMT5 (a position table in every layer)
    "mt5": Checkpoint("MT5ForConditionalGeneration", "MT5Config",
                      dict(**{**_T5, "vocab_size": VOCAB + 5}, feed_forward_proj="gated-gelu",
                           tie_word_embeddings=False),
                      damage_key="decoder.block.2.layer.1.EncDecAttention.k.weight", matrix_std=0.15, untie=True),
    "umt5": Checkpoint("UMT5ForConditionalGeneration", "UMT5Config",
                       dict(**_T5, feed_forward_proj="gated-gelu", tie_word_embeddings=False),
                       damage_key="encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight",
                       matrix_std=0.15),
}


def make_model(name: str, seed: int = 0, **overrides):
    """A seeded random float32 HF model of checkpoint `name`, eager attention, in eval mode.

    Weights are re-drawn at a larger scale than HF's init (std 0.02) and norms are
    perturbed away from their centre so that every tensor visibly matters in the parity checks.
    """
    import torch
    import transformers

    spec = CHECKPOINTS[name]
    config = getattr(transformers, spec.config)(**{**spec.kwargs, **overrides})
    config._attn_implementation = "eager"  # eager masks apply Mistral's sliding window
    torch.manual_seed(seed)
    model = getattr(transformers, spec.arch)(config).float().eval()
    with torch.no_grad():
        if spec.untie:
            model.lm_head.weight = torch.nn.Parameter(torch.empty_like(model.shared.weight))
            model.config.tie_word_embeddings = False
        for key, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(torch.randn_like(p) * 0.1 + (0.0 if "bias" in key else spec.norm_base))
            else:
                p.copy_(torch.randn_like(p) * spec.matrix_std)
        for key, buf in model.named_buffers():
            if key.endswith(spec.buffers) and spec.buffers:
                buf.copy_(torch.randn_like(buf) * 0.1)
    return model


def save(model, path, **kwargs) -> None:
    """save_pretrained with safetensors (the default in transformers 5)."""
    model.save_pretrained(path, safe_serialization=True, **kwargs)


def random_batch(batch: int, length: int, seed: int = 0, pad: bool = False, side: str = "left"):
    """int64 token ids [B, T] and an attention mask; with `pad`, row b keeps T - 2b tokens.

    Left padding is the default because it is the one a causal model can get wrong:
    right padding sits after every real token, so no real token could see it even if
    the mask were ignored.
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, size=(batch, length)).astype(np.int64)
    mask = np.ones((batch, length), np.int64)
    if pad:
        for b in range(1, batch):
            if side == "left":
                mask[b, :2 * b] = 0
            else:
                mask[b, length - 2 * b:] = 0
    return ids, mask


def check_text_tower_import(multimodal, reference, text_class: str, num_layers: int, tmp_path: Path) -> None:
    """A multimodal HF model saved and imported: the zoo model is its text tower (`text_class`,
    `num_layers` layers) with `reference`'s logits within 1e-4 on a masked batch, and its export
    loads in transformers as `text_class` with the same logits."""
    import transformers

    save(multimodal, tmp_path / "mm")
    model, params = zoo.from_hf(tmp_path / "mm")
    assert model.cfg.hf_architecture == text_class and model.cfg.num_layers == num_layers
    ids, mask = model_inputs("decoder", seed=4)[-1].values()
    real = mask.astype(bool)
    want = torch_logits(reference, ids, mask)
    got = np.asarray(model.apply({"params": params}, ids, mask))
    assert float(np.abs(got - want)[real].max()) <= 1e-4
    zoo.to_hf(model, params, tmp_path / "text")
    text_model = getattr(transformers, text_class).from_pretrained(tmp_path / "text", attn_implementation="eager")
    np.testing.assert_allclose(torch_logits(text_model.eval(), ids, mask)[real], want[real], atol=1e-4, rtol=0)


def model_inputs(kind: str, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Batches (HF keyword -> int64 array) for a registry kind, the hardest last.

    decoder: [3, 12] unpadded, right-padded, then left-padded (row b keeps 12 - 2b tokens).
    encoder: [3, 12] right-padded (row b keeps 12 - 3b tokens) with token types in {0, 1, 2}.
    encoder-decoder: encoder ids [3, 11] and decoder ids [3, 9], both right-padded per row.
    """
    rng = np.random.default_rng(seed)
    if kind == "decoder":
        return [dict(zip(("input_ids", "attention_mask"), random_batch(3, 12, seed=seed, pad=pad, side=side)))
                for pad, side in ((False, "left"), (True, "right"), (True, "left"))]
    if kind == "encoder":
        ids, mask = rng.integers(1, VOCAB, size=(3, 12)), np.ones((3, 12), np.int64)
        mask[1, 9:], mask[2, 6:] = 0, 0
        return [dict(input_ids=ids, attention_mask=mask, token_type_ids=rng.integers(0, 3, size=(3, 12)))]
    if kind == "encoder-decoder":
        ids, dec = rng.integers(2, VOCAB, size=(3, 11)), rng.integers(2, VOCAB, size=(3, 9))
        mask, dec_mask = np.ones_like(ids), np.ones_like(dec)
        mask[1, 7:], mask[2, 4:], dec_mask[1, 5:], dec_mask[2, 2:] = 0, 0, 0, 0
        return [dict(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask)]
    raise ValueError(f"unknown kind {kind!r}")


def checkpoint_inputs(name: str, kind: str, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """`model_inputs(kind, seed)` as checkpoint `name`'s model takes them (no token types where it has none)."""
    batches = model_inputs(kind, seed)
    if not CHECKPOINTS[name].token_types:
        batches = [{k: v for k, v in b.items() if k != "token_type_ids"} for b in batches]
    return batches


def torch_outputs(model, inputs: dict[str, np.ndarray], **kwargs) -> list[np.ndarray]:
    """Every tensor the PyTorch model returns (logits or last_hidden_state first), float32 numpy."""
    import torch

    with torch.no_grad():
        out = model(**{k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}, **kwargs)
    return [v.float().numpy() for v in out.values() if isinstance(v, torch.Tensor)]


def torch_logits(model, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Logits [B, T, V] from a PyTorch causal LM, float32 numpy."""
    inputs = {"input_ids": ids} if mask is None else {"input_ids": ids, "attention_mask": mask}
    return torch_outputs(model, inputs)[0]


# --- damaged checkpoints: the same error checks for every family --------------------------

def copy_checkpoint(src: Path, dst: Path) -> Path:
    """A private copy of a checkpoint dir that a test may damage."""
    shutil.copytree(src, dst)
    return dst


def edit_config(path: Path, **changes) -> None:
    """Overwrites fields of path/config.json."""
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def edit_tensors(path: Path, edit) -> None:
    """Rewrites path/model.safetensors after `edit(tensors)` changed the dict in place."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


TENSOR_DAMAGE = ("missing", "unexpected", "shape", "truncated")


def damage(path: Path, kind: str, key: str) -> list[str]:
    """Damages tensor `key` of the checkpoint at `path` in one way (TENSOR_DAMAGE) and
    returns the strings the loader's error must contain: the file, the key, and what
    went wrong."""
    file = path / "model.safetensors"
    if kind == "missing":
        edit_tensors(path, lambda t: t.pop(key))
        return [str(file), repr(key), "missing"]
    if kind == "unexpected":
        extra = key.rsplit(".", 1)[0] + "_extra.weight"
        edit_tensors(path, lambda t: t.update({extra: np.zeros(3, np.float32)}))
        return [str(file), repr(extra), "unexpected"]
    if kind == "shape":
        old = {}

        def halve_first_axis(tensors):
            old["shape"] = tensors[key].shape
            tensors[key] = np.zeros((old["shape"][0] // 2, *old["shape"][1:]), np.float32)

        edit_tensors(path, halve_first_axis)
        new = (old["shape"][0] // 2, *old["shape"][1:])
        return [str(file), repr(key), f"shape {new}", f"expected {old['shape']}"]
    if kind == "truncated":
        # Cut the file in the middle of `key`'s data: every tensor before it is whole,
        # so `key` is the first one cut off.
        data = file.read_bytes()
        n = int.from_bytes(data[:8], "little")
        begin, end = json.loads(data[8:8 + n])[key]["data_offsets"]
        file.write_bytes(data[:8 + n + (begin + end) // 2])
        return [str(file), repr(key), "truncated"]
    raise ValueError(f"unknown damage {kind!r}")


def check_damaged_checkpoint(src: Path, tmp_path: Path, kind: str, key: str) -> None:
    """A copy of checkpoint `src` with tensor `key` damaged (see `damage`) fails to load
    with a CheckpointError naming the file and the tensor."""
    path = copy_checkpoint(src, tmp_path / f"damaged-{kind}")
    needles = damage(path, kind, key)
    try:
        zoo.from_hf(path)
    except CheckpointError as e:
        missing = [n for n in needles if n not in str(e)]
        assert not missing, f"{kind}: {missing} not in the error {str(e)!r}"
    else:
        raise AssertionError(f"{kind}: a damaged checkpoint loaded without an error")


EXPORTED_FILES = ["config.json", "generation_config.json", "model.safetensors"]


def check_to_hf_is_atomic(model, params, tmp_path: Path, monkeypatch) -> None:
    """zoo.to_hf failing midway (a simulated full disk after four tensors) leaves neither a
    half-written target nor a temporary dir, and an existing empty target as it was; a dir
    with files in it is refused before any work and left untouched; a later successful
    export fills the empty target."""
    real = zoo.hf.convert._hf_tensor
    calls = {"n": 0}

    def fail_midway(*args):
        calls["n"] += 1
        if calls["n"] == 5:  # after the header and four tensors are on disk
            raise OSError("disk full (simulated)")
        return real(*args)

    monkeypatch.setattr(zoo.hf.convert, "_hf_tensor", fail_midway)
    root = tmp_path / "atomic"
    root.mkdir()
    with pytest.raises(OSError, match="simulated"):
        zoo.to_hf(model, params, root / "fresh")
    assert calls["n"] == 5
    assert os.listdir(root) == []  # neither the target nor a temp dir

    existing = root / "existing"
    existing.mkdir()
    calls["n"] = 0
    with pytest.raises(OSError, match="simulated"):
        zoo.to_hf(model, params, existing)
    assert os.listdir(root) == ["existing"] and os.listdir(existing) == []

    (existing / "config.json").write_text("old")
    calls["n"] = 0
    with pytest.raises(OutputError, match="not empty"):
        zoo.to_hf(model, params, existing)
    assert calls["n"] == 0  # refused before any work
    assert os.listdir(root) == ["existing"]
    assert os.listdir(existing) == ["config.json"] and (existing / "config.json").read_text() == "old"

    (existing / "config.json").unlink()
    monkeypatch.setattr(zoo.hf.convert, "_hf_tensor", real)  # a successful export fills the empty dir
    zoo.to_hf(model, params, existing)
    assert os.listdir(root) == ["existing"]
    assert sorted(os.listdir(existing)) == EXPORTED_FILES
