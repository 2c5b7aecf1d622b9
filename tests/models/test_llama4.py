"""Llama 4 text (moe family): the chunked-attention mask against transformers' rule, chunked
kernels against an explicit mask, sigmoid routing against a dense float64 reference, cached
decoding against the full forward, the Maverick layer interleave, a sharded step, presets and
the config translation. Parity with transformers itself is in test_contract.py and
tests/inference/test_generate.py (checkpoints "llama4" and "llama4-maverick")."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import kernels
import zoo
from zoo.hf.rules import CheckpointError
from zoo.models.moe import hf as moe_hf
from zoo.models.moe import model as moe
from zoo.nn.masks import chunked_segment_ids

from decode_utils import assert_cached_greedy_equals_forward
from step_utils import assert_same_step, packed_batch, shard_shapes, single_and_sharded_step


def _hf_chunked_keep(mask_BT, chunk):
    """transformers' create_chunked_causal_mask for a 0/1 attention mask: key kv is kept for
    query q iff kv <= q, both in one chunk counted from the row's leading padding, kv not padding."""
    b, t = mask_BT.shape
    lead = (np.cumsum(mask_BT, -1) == 0).sum(-1)
    q, kv = np.arange(t)[:, None], np.arange(t)[None, :]
    keep = np.zeros((b, t, t), bool)
    for r in range(b):
        keep[r] = (kv <= q) & ((kv - lead[r]) // chunk == (q - lead[r]) // chunk) & (mask_BT[r][None, :] > 0)
    return keep


def _zoo_keep(ids_BT):
    """What kernels.attention keeps for segment ids (causal): same id, not padding."""
    t = ids_BT.shape[1]
    causal = np.arange(t)[None, :] <= np.arange(t)[:, None]
    return (ids_BT[:, :, None] == ids_BT[:, None, :]) & (ids_BT[:, None, :] > 0) & causal


def test_chunk_ids_follow_transformers_mask_for_padding_and_packing():
    t, chunk = 23, 5
    mask = np.ones((4, t), np.int32)
    mask[1, :3] = 0  # left padding: chunks count from the first real token
    mask[2, -4:] = 0  # right padding
    mask[3, :7] = 0
    ids = np.asarray(chunked_segment_ids(jnp.asarray(mask), 4, t, chunk))
    keep = _zoo_keep(ids)
    real = mask[:, :, None] > 0  # padded queries attend nowhere in the zoo; HF's rows there don't matter
    np.testing.assert_array_equal(keep & real, _hf_chunked_keep(mask, chunk) & real)
    np.testing.assert_array_equal(np.asarray(chunked_segment_ids(None, 4, t, chunk)) > 0, np.ones((4, t), bool))
    # packed documents: HF's rule for packed position ids, same document and positions // chunk equal
    seg = packed_batch(512, b=2, t=32)["segment_ids"]
    pos = np.where(seg == 2, np.arange(32) - 18, np.arange(32))
    keep = _zoo_keep(np.asarray(chunked_segment_ids(jnp.asarray(seg), 2, 32, chunk)))
    expected = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] > 0) & \
        (pos[:, :, None] // chunk == pos[:, None, :] // chunk) & (np.arange(32)[None, :] <= np.arange(32)[:, None])
    np.testing.assert_array_equal(keep, expected)


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
def test_chunked_attention_through_kernels_matches_explicit_mask(implementation):
    """Chunk ids plus a window of one chunk, through the kernels (the Pallas kernel skips
    blocks outside the window), equal a float64 softmax under the explicit chunked mask."""
    b, t, n, k, h, chunk = 2, 40, 4, 2, 16, 7
    rng = np.random.default_rng(0)
    q, kk, v = (rng.standard_normal((b, t, heads, h)).astype(np.float32) for heads in (n, k, k))
    mask = np.ones((b, t), np.int32)
    mask[1, :5] = 0
    ids = chunked_segment_ids(jnp.asarray(mask), b, t, chunk)
    out = kernels.attention(jnp.asarray(q), jnp.asarray(kk), jnp.asarray(v), causal=True, segment_ids=ids,
                            sliding_window=chunk, implementation=implementation)
    keep = _hf_chunked_keep(mask, chunk)
    kx, vx = np.repeat(kk, n // k, axis=2).astype(np.float64), np.repeat(v, n // k, axis=2).astype(np.float64)
    logits = np.einsum("btnh,bsnh->bnts", q.astype(np.float64), kx) / np.sqrt(h)
    logits = np.where(keep[:, None], logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    ref = np.einsum("bnts,bsnh->btnh", w / w.sum(-1, keepdims=True), vx)
    real = mask > 0
    np.testing.assert_allclose(np.asarray(out)[real], ref[real], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("k", [1, 2])
def test_sigmoid_routing_scales_expert_inputs_and_adds_shared_expert(k):
    """transformers' Llama4TextMoe: every expert on x * s_e (s_e = sigmoid of a kept logit, 0
    otherwise), summed, plus the shared expert; float64 reference."""
    e, d, f, n = 4, 16, 24, 40
    rng = np.random.default_rng(k)
    x = rng.normal(size=(1, n, d)).astype(np.float32)
    w = {name: rng.normal(size=shape).astype(np.float32) * 0.3
         for name, shape in (("gate_proj", (e, d, f)), ("up_proj", (e, d, f)), ("down_proj", (e, f, d)))}
    shared = {name: {"kernel": rng.normal(size=shape).astype(np.float32) * 0.3}
              for name, shape in (("gate_proj", (d, f)), ("up_proj", (d, f)), ("down_proj", (f, d)))}
    router = rng.normal(size=(d, e)).astype(np.float32)
    block = moe.MoEMLP(d, f, e, k, router_type="sigmoid", shared_expert_size=f)
    y, stats = block.apply({"params": {"router": {"kernel": router}, **w, "shared_expert": shared}}, x)

    silu = lambda z: z / (1 + np.exp(-z))
    mlp = lambda z, g, u, dn: (silu(z @ g) * (z @ u)) @ dn
    x64 = x[0].astype(np.float64)
    logits = x64 @ router
    ref = mlp(x64, *(shared[p]["kernel"].astype(np.float64) for p in ("gate_proj", "up_proj", "down_proj")))
    top = np.argsort(-logits, axis=-1, kind="stable")[:, :k]
    for i in range(e):
        s = np.where((top == i).any(-1), 1 / (1 + np.exp(-logits[:, i])), 0.0)[:, None]
        ref += mlp(x64 * s, *(w[p][i].astype(np.float64) for p in ("gate_proj", "up_proj", "down_proj")))
    np.testing.assert_allclose(np.asarray(y[0]), ref, rtol=2e-5, atol=2e-5)
    assert float(stats["tokens"]) == n and float(stats["expert_counts"].sum()) == n * k


def test_maverick_interleaves_dense_and_routed_layers():
    cfg = zoo.config("tiny-llama4-maverick")
    assert cfg.moe_layers == (1, 3)
    params = nn.unbox(jax.eval_shape(lambda: zoo.build(cfg).init(jax.random.PRNGKey(0),
                                                                 jnp.zeros((1, 8), jnp.int32))))["params"]
    layers = params["layers"]
    assert layers["layer_0"]["mlp"]["gate_proj"]["kernel"].shape == (2, 64, 128)  # dense layers 0 and 2
    assert layers["layer_1"]["mlp"]["gate_proj"].shape == (2, 4, 64, 64)  # routed layers 1 and 3
    assert layers["layer_1"]["mlp"]["shared_expert"]["gate_proj"]["kernel"].shape == (2, 64, 64)
    kinds, ids = cfg.attention_kinds()
    assert [kinds[i][1] is None for i in ids] == [False, False, False, True]  # layer 3 NoPE
    assert [kinds[i][3] for i in ids] == [16, 16, 16, None]  # RoPE layers chunked


@pytest.mark.parametrize("preset", ["tiny-llama4", "tiny-llama4-maverick"])
def test_cached_decoding_equals_the_full_forward(preset):
    """Greedy tokens from the KV cache (chunk 16 crossed, temperature on) equal the argmax of the
    full forward over the left-padded prompt and the tokens so far."""
    assert_cached_greedy_equals_forward(zoo.config(preset, attention_chunk_size=5, floor_scale=4, attn_scale=0.5))


def test_sharded_step_of_maverick_matches_single_device():
    if jax.device_count() < 8:
        pytest.skip("needs 8 fake CPU devices (tests/conftest.py)")
    cfg = zoo.config("tiny-llama4-maverick", dtype="float32", param_dtype="float32")
    single, sharded, start = single_and_sharded_step(cfg, packed_batch(cfg.vocab_size), "fsdp=2,expert=2,tensor=2",
                                                     grad_accum=2)
    gate = start["params"]["layers"]["layer_1"]["mlp"]["gate_proj"]  # [L/2, E, D, F]
    assert gate.shape == (2, 4, 64, 64) and shard_shapes(gate) == {(2, 2, 32, 32)}
    assert_same_step(single, sharded, keys=tuple(sorted(single[1])))
    assert single[1]["load_balancing_loss"] > 0


# --- presets and translation ------------------------------------------------------------------

def test_full_size_text_parameter_counts():
    """Without the vision tower (published 109B / 400B, 17B active): counted from the shapes by
    hand here, independently of zoo.param_count's traversal."""
    for name, expected in (("llama4-scout-17b-16e", 107_769_861_120), ("llama4-maverick-17b-128e", 400_711_848_960)):
        cfg = zoo.config(name)
        d, v, n, k, h, f, e = (cfg.hidden_size, cfg.vocab_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                               cfg.intermediate_size, cfg.num_experts)
        attn = d * h * (2 * n + 2 * k) + 2 * d
        routed = len(cfg.moe_layers) * (d * e + 3 * e * d * f + 3 * d * f)
        dense = (cfg.num_layers - len(cfg.moe_layers)) * 3 * d * (cfg.dense_intermediate_size or 0)
        by_hand = cfg.num_layers * attn + routed + dense + 2 * v * d + d
        assert by_hand == expected == zoo.param_count(cfg), name


@pytest.mark.torch
def test_default_hf_config_reads_as_scout_like():
    import transformers

    hf = transformers.Llama4TextConfig().to_dict()
    hf["architectures"] = ["Llama4ForCausalLM"]
    cfg = moe_hf.config_from_hf(hf, "default", "Llama4ForCausalLM")
    assert (cfg.num_layers, cfg.head_dim, cfg.num_experts, cfg.num_experts_per_tok) == (48, 128, 16, 1)
    assert cfg.nope_layers == tuple(range(3, 48, 4)) and cfg.attention_chunk_size == 8192
    assert cfg.qk_l2_norm and cfg.attn_temperature_tuning and cfg.router_type == "sigmoid"
    assert cfg.shared_expert_size == cfg.intermediate_size and cfg.moe_layer_step == 1


def _tiny_hf(**changes) -> dict:
    hf = moe_hf.config_to_hf(zoo.config("tiny-llama4-maverick"))
    return {**hf, **changes}


def test_absent_keys_take_transformers_defaults():
    hf = _tiny_hf()
    for key in ("head_dim", "attention_chunk_size", "no_rope_layers", "layer_types", "floor_scale"):
        hf.pop(key)
    cfg = moe_hf.config_from_hf(hf, "x", "Llama4ForCausalLM")
    assert cfg.head_dim == 128 and cfg.attention_chunk_size == 8192 and cfg.floor_scale == 8192
    assert cfg.nope_layers == (3,) and cfg.layer_types == ("chunked_attention",) * 3 + ("full_attention",)
    hf = _tiny_hf(attention_chunk_size=None, layer_types=None)  # null chunk: no chunked layers
    cfg = moe_hf.config_from_hf(hf, "x", "Llama4ForCausalLM")
    assert cfg.attention_chunk_size is None and cfg.layer_types is None


@pytest.mark.parametrize("changes, message", [
    ({"quantization_config": {"quant_method": "compressed-tensors"}}, "compressed-tensors"),
    ({"moe_layers": [0, 2]}, "moe_layers"),
    ({"attention_bias": True}, "attention_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_unsupported_checkpoints_are_refused(changes, message):
    with pytest.raises(CheckpointError, match=message):
        moe_hf.config_from_hf(_tiny_hf(**changes), "x", "Llama4ForCausalLM")


def test_llama4_features_export_only_as_llama4():
    cfg = zoo.config("tiny-mixtral", attention_chunk_size=4, layer_types=("chunked_attention",) * 2)
    with pytest.raises(CheckpointError, match="only exported as Llama4ForCausalLM"):
        moe_hf.config_to_hf(cfg)
    with pytest.raises(CheckpointError, match="sigmoid routing"):
        moe_hf.config_to_hf(zoo.config("tiny-mixtral", router_type="sigmoid"))


@pytest.mark.torch
def test_multimodal_checkpoint_imports_its_text_tower(tmp_path):
    """Llama4ForConditionalGeneration (how the hub ships Llama 4): the text tower imports as a
    Llama4ForCausalLM whose logits on text equal the multimodal model's language model (its own
    text-only forward fails in transformers 5.24: 'MoeCausalLMOutputWithPast' has no
    image_outputs); the vision model and projector are left out; the export is a
    Llama4ForCausalLM transformers loads."""
    import torch
    import transformers

    import hf_utils
    from hf_utils import check_text_tower_import

    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=28,
                  patch_size=14, vision_output_dim=32, projector_input_dim=32, projector_output_dim=32)
    text = {**hf_utils._LLAMA4, "num_experts_per_tok": 1}
    config = transformers.Llama4Config(text_config=text, vision_config=vision)
    config._attn_implementation = "eager"
    config.text_config._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = transformers.Llama4ForConditionalGeneration(config).float().eval()
    with torch.no_grad():
        for key, p in hf.named_parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if key.endswith("layernorm.weight") else 0.0) if p.ndim == 1
                    else torch.randn_like(p) * 0.08)
    check_text_tower_import(hf, hf.language_model, "Llama4ForCausalLM", 4, tmp_path)
