"""The deepseek family (DeepSeek-V3/V2, Moonlight, Kimi K2): cached decoding against the full
forward, exact parameter counts from the shapes, the softmax scale and RoPE factor against
transformers, and the refusals of the config translation. Parity with transformers (left
padding, round trip, damage, sharded step, pretraining) is in test_contract.py and greedy
generation in tests/inference/test_generate.py; routing in test_deepseek_routing.py."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import zoo
from zoo.hf.rules import CheckpointError
from zoo.models.deepseek import hf as deepseek_hf

from decode_utils import assert_cached_greedy_equals_forward


@pytest.mark.parametrize("preset", ["tiny-deepseek", "tiny-deepseek-v2"])
def test_cached_decoding_equals_the_full_forward(preset):
    """Greedy tokens from the KV cache equal the argmax of the full forward over the left-padded
    prompt and the tokens so far."""
    assert_cached_greedy_equals_forward(zoo.config(preset))


def _teacher_forced_decode(model, params, ids, mask, prompt_len):
    """Logits [B, T - prompt_len + 1, V] of decode mode: the prompt as one chunk, then one given
    token a step; and the final cache."""
    b, t = ids.shape
    dmodel = model.clone(decode=True)
    _, init = dmodel.apply({"params": params}, jnp.zeros((b, t), jnp.int32), mutable=["cache"])
    step = jax.jit(lambda cache, ids, mask, positions: dmodel.apply(
        {"params": params, "cache": cache}, ids, mask, positions=positions, mutable=["cache"]))
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0).astype(np.int32)
    logits, cache = step(init["cache"], ids[:, :prompt_len], mask[:, :prompt_len], positions[:, :prompt_len])
    out = [logits[:, -1]]
    for i in range(prompt_len, t):
        logits, cache = step(cache["cache"], ids[:, i:i + 1], mask[:, i:i + 1], positions[:, i:i + 1])
        out.append(logits[:, -1])
    return np.stack([np.asarray(x) for x in out], axis=1), cache["cache"]


def _cache_leaves(cache) -> dict[str, list]:
    leaves: dict[str, list] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(cache)[0]:
        leaves.setdefault(path[-1].key, []).append(leaf)
    return leaves


def test_latent_cache_equals_the_full_cache_and_the_forward(preset="tiny-deepseek"):
    """Decoding from the latent cache (absorbed projections) gives the logits of decoding from
    expanded keys and values and of the no-cache forward, on a left-padded batch; the cache holds
    (kv_lora_rank + qk_rope_head_dim) values a token a layer and no keys or values."""
    cfg = zoo.config(preset)
    assert cfg.kv_cache == "latent"
    model, full_model = zoo.build(cfg), zoo.build(dataclasses.replace(cfg, kv_cache="full"))
    rng = np.random.default_rng(0)
    ids = rng.integers(3, cfg.vocab_size, (2, 10)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[0, :3] = 0
    ids[mask == 0] = 0
    params = nn.unbox(model.init(jax.random.PRNGKey(2), jnp.asarray(ids))["params"])
    prompt_len = 5
    latent, latent_cache = _teacher_forced_decode(model, params, ids, mask, prompt_len)
    full, full_cache = _teacher_forced_decode(full_model, params, ids, mask, prompt_len)
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    forward = np.asarray(model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask),
                                     positions=jnp.asarray(positions)))[:, prompt_len - 1:]
    scale = np.abs(forward).max()
    assert scale > 0.1
    np.testing.assert_allclose(full, forward, rtol=0, atol=2e-6 * scale)
    np.testing.assert_allclose(latent, forward, rtol=0, atol=2e-6 * scale)
    np.testing.assert_allclose(latent, full, rtol=0, atol=2e-6 * scale)

    leaves, full_leaves = _cache_leaves(latent_cache), _cache_leaves(full_cache)
    assert set(leaves) == {"latent", "segment_ids", "index"}
    assert {"key", "value"} <= set(full_leaves)
    b, s = ids.shape
    per_token = sum(x.nbytes for x in leaves["latent"]) / (b * s)
    assert per_token == (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_layers * 4
    full_per_token = sum(x.nbytes for name in ("key", "value") for x in full_leaves[name]) / (b * s)
    assert full_per_token == cfg.num_heads * (cfg.head_dim + cfg.v_head_dim) * cfg.num_layers * 4


def test_deepseek_v3_latent_cache_is_70272_bytes_a_token_in_bfloat16():
    """The full-size cache, abstractly: (512 + 64) x 61 layers x 2 bytes a token."""
    cfg = dataclasses.replace(zoo.config("deepseek-v3-671b"), dtype="bfloat16", param_dtype="bfloat16")
    dmodel = zoo.build(cfg).clone(decode=True)
    ids = jnp.zeros((1, 8), jnp.int32)
    params = jax.eval_shape(lambda: dmodel.init(jax.random.PRNGKey(0), ids))["params"]
    _, variables = jax.eval_shape(lambda p: dmodel.apply({"params": p}, ids, mutable=["cache"]), params)
    leaves = _cache_leaves(variables["cache"])
    per_token = sum(np.prod(x.shape) * x.dtype.itemsize for x in leaves["latent"]) / 8
    assert per_token == (512 + 64) * 61 * 2 == 70_272


def _count_by_hand(cfg) -> int:
    d, n, r, q, v = cfg.hidden_size, cfg.num_heads, cfg.kv_lora_rank, cfg.q_lora_rank, cfg.vocab_size
    dn, dr, dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    e, fm, s = cfg.num_experts, cfg.moe_intermediate_size, cfg.n_shared_experts
    attn = (d * q + q + q * n * (dn + dr) if q else d * n * (dn + dr)) + d * (r + dr) + r + r * n * (dn + dv) + \
        n * dv * d
    bias = e if cfg.topk_method == "noaux_tc" else 0
    moe = e * 3 * d * fm + d * e + bias + 3 * d * s * fm
    k = cfg.first_k_dense_replace
    return cfg.num_layers * (attn + 2 * d) + k * 3 * d * cfg.intermediate_size + (cfg.num_layers - k) * moe + \
        2 * v * d + d


@pytest.mark.parametrize("name, expected", [
    ("deepseek-v3-671b", 671_026_419_200),  # transformers: 671,026,404,352 + 14,848 correction-bias buffers
    ("deepseek-v2-lite-16b", 15_706_484_224),
    ("moonlight-16b-a3b", 15_960_110_208),
    ("kimi-k2-1t", 1_026_408_232_448),  # the model card's "1T"
])
def test_full_size_parameter_counts(name, expected):
    cfg = zoo.config(name)
    assert _count_by_hand(cfg) == expected == zoo.param_count(cfg)


@pytest.mark.parametrize("name, active, published", [
    ("deepseek-v3-671b", 36_625_618_432, 37), ("kimi-k2-1t", 31_687_095_808, 32),
    ("deepseek-v2-lite-16b", 2_451_435_008, None)])  # its card says 2.4B: truncated, not rounded
def test_active_parameter_counts(name, active, published):
    """Activated parameters (the k routed experts of E, without the input-embedding lookup, MTP
    depths never counted) round to the model cards' figures; the count is what a token's forward
    multiplies: flops_per_token is 6 x (active less norms and the correction biases) + attention."""
    cfg = zoo.config(name)
    assert zoo.active_param_count(cfg) == active
    assert published is None or round(active / 1e9) == published
    mtp = dataclasses.replace(cfg, num_mtp_layers=1)
    assert zoo.active_param_count(mtp) == active and zoo.param_count(mtp) > zoo.param_count(cfg)
    d, r, q = cfg.hidden_size, cfg.kv_lora_rank, cfg.q_lora_rank or 0
    norms = cfg.num_layers * (2 * d + r + q) + d
    bias = cfg.moe_layers * cfg.num_experts if cfg.topk_method == "noaux_tc" else 0
    attention = 6 * cfg.num_layers * cfg.num_heads * (cfg.head_dim + cfg.v_head_dim) * cfg.attended_keys(4096)
    assert cfg.flops_per_token(4096) == 6 * (active - norms - bias) + attention


@pytest.mark.torch
@pytest.mark.parametrize("name", ["deepseek_v3", "deepseek_v2"])
def test_softmax_scale_and_rope_factor_equal_transformers(name):
    """HF's attention `scaling` (YaRN mscale_all_dim correction) and the factor its rotary
    embedding multiplies cos/sin by (mscale / mscale_all_dim)."""
    import hf_utils

    hf = hf_utils.make_model(name)
    cfg = deepseek_hf.config_from_hf(hf.config.to_dict(), "x", hf_utils.CHECKPOINTS[name].arch)
    assert cfg.softmax_scale == pytest.approx(hf.model.layers[0].self_attn.scaling, rel=1e-12)
    assert cfg.rope_factor == pytest.approx(hf.model.rotary_emb.attention_scaling, rel=1e-12)
    assert cfg.rope_factor != 1.0 or name == "deepseek_v2"


def _tiny_hf(name="tiny-deepseek", **changes) -> dict:
    return {**deepseek_hf.config_to_hf(zoo.config(name)), **changes}


@pytest.mark.parametrize("changes, message", [
    ({"quantization_config": {"quant_method": "fp8"}}, "fp8"),
    ({"moe_layer_freq": 2}, "moe_layer_freq"),
    ({"num_key_value_heads": 2}, "num_key_value_heads"),
    ({"topk_method": "greedy"}, "topk_method"),
    ({"attention_bias": True}, "attention_bias"),
    ({"rope_interleave": False}, "rope_interleave"),
])
def test_unsupported_v3_checkpoints_are_refused(changes, message):
    with pytest.raises(CheckpointError, match=message):
        deepseek_hf.config_from_hf(_tiny_hf(**changes), "x", "DeepseekV3ForCausalLM")


def test_v2_refuses_what_transformers_would_ignore():
    with pytest.raises(CheckpointError, match="norm_topk_prob"):
        deepseek_hf.config_from_hf(_tiny_hf("tiny-deepseek-v2", norm_topk_prob=True), "x", "DeepseekV2ForCausalLM")
    with pytest.raises(CheckpointError, match="routes with greedy or group_limited_greedy"):
        deepseek_hf.config_to_hf(zoo.config("tiny-deepseek", architecture="DeepseekV2ForCausalLM"))


def test_config_checks():
    with pytest.raises(ValueError, match="no grouped kv heads"):
        zoo.config("tiny-deepseek", num_kv_heads=2)
    with pytest.raises(ValueError, match="topk_group"):
        zoo.config("tiny-deepseek", topk_group=1, num_experts_per_tok=3)  # 1 group of 2 experts < 3
    with pytest.raises(ValueError, match="head_dim is qk_nope_head_dim"):
        zoo.config("tiny-deepseek", head_dim=16)


def test_train_step_moves_the_correction_bias_toward_balanced_load():
    """The train step adds bias_update_rate * sign(mean load - load) to each MoE layer's correction
    bias, from the batch's expert loads (checked exactly against a separate forward); the
    optimizer neither decays it nor moves it (no gradient), and repeated steps on a skewed start
    spread the load."""
    from zoo.models.moe.model import ROUTER_LOAD
    from zoo.sharding import make_mesh
    from zoo.training.optimizer import OptimConfig
    from zoo.training.step import init_state, make_trainer, mesh_context

    from step_utils import packed_batch

    rate = 0.02
    cfg = dataclasses.replace(zoo.config("tiny-deepseek"), bias_update_rate=rate)
    assert cfg.balances_routers
    batch = packed_batch(cfg.vocab_size, b=4, t=32)
    mesh = make_mesh("data=1", devices=jax.devices()[:1])
    tr = make_trainer(cfg, mesh, OptimConfig(lr=1e-2, warmup_steps=0, weight_decay=0.1), batch_size=4, seq_len=32)
    state = jax.device_get(init_state(tr, mesh, seed=0))
    bias = np.zeros(state["params"]["layers"]["mlp"]["correction_bias"].shape, np.float32)
    bias[:, :2] = 1.0  # every token picks experts 0 and 1
    state["params"]["layers"]["mlp"]["correction_bias"] = bias
    _, sown = tr.model.apply({"params": state["params"]}, batch["input_ids"], positions=batch["positions"],
                             segment_ids=batch["segment_ids"], mutable=[ROUTER_LOAD])
    load = np.asarray(sown[ROUTER_LOAD]["counts"][0])
    tokens = (batch["segment_ids"] > 0).sum()
    np.testing.assert_array_equal(load.sum(-1), cfg.num_experts_per_tok * tokens)
    assert np.all(load[:, :2] == tokens)

    ratios = []
    with mesh_context(mesh):
        state = jax.device_put(state, tr.state_shardings)
        for i in range(40):
            state, metrics = tr.step(state, {k: jax.device_put(v, tr.batch_sharding) for k, v in batch.items()})
            ratios.append(float(metrics["router_max_load"]))
            if i == 0:
                expected = bias + np.float32(rate) * np.sign(load.mean(-1, keepdims=True) - load).astype(np.float32)
                got = np.asarray(state["params"]["layers"]["mlp"]["correction_bias"])
                np.testing.assert_array_equal(got, expected)
    first = ratios[0]
    assert first == pytest.approx(float(np.mean(load.max(-1) / load.mean(-1))), rel=1e-6)
    assert first == pytest.approx(cfg.num_experts / cfg.num_experts_per_tok)  # 4: two experts take everything
    assert max(ratios[-5:]) < 0.6 * first, ratios


def _mtp_setup(mtp_loss_weight=0.3):
    """A tiny V3 with one MTP depth and plain RoPE, random norms and biases, and a packed batch."""
    from step_utils import packed_batch

    cfg = dataclasses.replace(zoo.config("tiny-deepseek"), num_mtp_layers=1, mtp_loss_weight=mtp_loss_weight,
                              rope_scaling=None, yarn_mscale=None, yarn_mscale_all_dim=None)
    model = zoo.build(cfg)
    batch = packed_batch(cfg.vocab_size, b=2, t=32, seed=3)
    params = nn.unbox(model.init(jax.random.PRNGKey(4), jnp.asarray(batch["input_ids"]))["params"])
    rng = np.random.default_rng(5)

    def perturb(path, x):
        name = path[-1].key
        if name == "scale":
            return x * (1 + 0.2 * rng.standard_normal(x.shape)).astype(np.float32)
        if name == "correction_bias":
            return (0.05 * rng.standard_normal(x.shape)).astype(np.float32)
        return x * 8.0  # O(1) activations: every piece of the layer matters to the loss
    params = jax.tree_util.tree_map_with_path(perturb, jax.device_get(params))
    return cfg, model, params, batch


def _clm_loss(model, params, batch):
    from zoo import objectives

    total, sums = objectives.get("clm").loss_fn(model, params, {k: jnp.asarray(v) for k, v in batch.items()}, None)
    return np.float64(total) / np.float64(sums["weight"]), jax.device_get(sums)


def test_mtp_loss_equals_a_float64_numpy_implementation():
    """clm loss with MTP = the loss without it + mtp_loss_weight x the MTP loss of an independent
    float64 numpy forward of the MTP depth (from the main model's final hidden states), on packed
    rows of two documents and padding."""
    from deepseek_reference import mtp_loss

    cfg, model, params, batch = _mtp_setup()
    with_mtp, sums = _clm_loss(model, params, batch)
    without, _ = _clm_loss(zoo.build(dataclasses.replace(cfg, mtp_loss_weight=0.0)), params, batch)
    hidden = model.apply({"params": params}, jnp.asarray(batch["input_ids"]), positions=jnp.asarray(batch["positions"]),
                         segment_ids=jnp.asarray(batch["segment_ids"]), return_hidden=True)
    f64 = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    expected = mtp_loss(f64, cfg, np.asarray(hidden, np.float64), batch["input_ids"], batch["segment_ids"],
                        batch["positions"])
    assert 1.0 < expected < 20.0
    np.testing.assert_allclose(sums["mtp_loss"] / sums["weight"], expected, rtol=2e-5)
    np.testing.assert_allclose(with_mtp - without, 0.3 * expected, rtol=2e-5)


def test_mtp_off_gives_the_loss_of_the_model_without_mtp_exactly():
    """mtp_loss_weight 0 skips the MTP depth: the loss and every sum equal, bit for bit, those of the
    same model built without MTP (its params without mtp_0); inference never runs MTP."""
    cfg, _, params, batch = _mtp_setup(mtp_loss_weight=0.0)
    off, off_sums = _clm_loss(zoo.build(cfg), params, batch)
    plain = {k: v for k, v in params.items() if k != "mtp_0"}
    base, base_sums = _clm_loss(zoo.build(dataclasses.replace(cfg, num_mtp_layers=0)), plain, batch)
    assert off == base and "mtp_loss" not in off_sums
    assert set(off_sums) == set(base_sums)
    for key in base_sums:
        np.testing.assert_array_equal(off_sums[key], base_sums[key])
    ids = jnp.asarray(batch["input_ids"])
    on_model = zoo.build(dataclasses.replace(cfg, mtp_loss_weight=0.3))
    np.testing.assert_array_equal(np.asarray(on_model.apply({"params": params}, ids)),
                                  np.asarray(zoo.build(dataclasses.replace(cfg, num_mtp_layers=0)).apply(
                                      {"params": plain}, ids)))


def test_mtp_weights_export_and_import_in_the_release_layout(tmp_path):
    """A model with one MTP depth exports it as layer L (enorm, hnorm, eh_proj, a MoE layer,
    shared_head.norm, and the embedding and LM head again); import finds the depth from the
    tensors (config.json says num_nextn_predict_layers either way), bit-exact, re-export writes
    the same tensors, and a copy that differs from its source is refused by name."""
    from safetensors.numpy import load_file

    from zoo.hf.convert import from_hf, to_hf

    import hf_utils

    cfg, model, params, _ = _mtp_setup()
    to_hf(model, params, tmp_path / "a")
    tensors = load_file(tmp_path / "a" / "model.safetensors")
    layer = f"model.layers.{cfg.num_layers}."
    for name in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                 "self_attn.kv_b_proj.weight", "mlp.gate.e_score_correction_bias", "mlp.experts.7.down_proj.weight"):
        assert layer + name in tensors, name
    np.testing.assert_array_equal(tensors[layer + "embed_tokens.weight"], tensors["model.embed_tokens.weight"])
    np.testing.assert_array_equal(tensors[layer + "shared_head.head.weight"], tensors["lm_head.weight"])
    np.testing.assert_array_equal(tensors[layer + "eh_proj.weight"], np.asarray(params["mtp_0"]["eh_proj"]["kernel"]).T)
    assert json.loads((tmp_path / "a" / "config.json").read_text())["num_nextn_predict_layers"] == 1

    hf_utils.edit_config(tmp_path / "a", num_nextn_predict_layers=0)  # the tensors decide, not config.json
    loaded_model, loaded = from_hf(tmp_path / "a")
    assert loaded_model.cfg.num_mtp_layers == 1
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded), jax.device_get(params))
    to_hf(loaded_model, loaded, tmp_path / "b")
    again = load_file(tmp_path / "b" / "model.safetensors")
    assert set(again) == set(tensors)
    for key in tensors:
        np.testing.assert_array_equal(again[key], tensors[key], err_msg=key)

    hf_utils.edit_tensors(tmp_path / "b", lambda t: t.update({layer + "embed_tokens.weight":
                                                             t[layer + "embed_tokens.weight"] * 2}))
    with pytest.raises(CheckpointError, match=rf"{layer}embed_tokens.weight.*must equal.*model.embed_tokens.weight"):
        from_hf(tmp_path / "b")


def test_a_checkpoint_without_mtp_tensors_imports_without_mtp(tmp_path):
    """transformers' config says num_nextn_predict_layers 1 but saves no MTP tensor: no MTP depth."""
    from zoo.hf.convert import from_hf, to_hf

    import hf_utils

    cfg = zoo.config("tiny-deepseek")
    model = zoo.build(cfg)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
    to_hf(model, params, tmp_path / "a")
    hf_utils.edit_config(tmp_path / "a", num_nextn_predict_layers=1)
    assert from_hf(tmp_path / "a")[0].cfg.num_mtp_layers == 0


@pytest.mark.torch
def test_mtp_loss_equals_transformers_mtp_model(tmp_path):
    """The exported MTP depth loaded by transformers (DeepseekV3ForCausalLM, then MtpModel from
    the same files: its `forward_layer` on the main model's last hidden states and the next
    tokens) gives next-next-token logits whose mean cross-entropy is the zoo's mtp_loss."""
    import torch
    from transformers import DeepseekV3ForCausalLM
    from transformers.modeling_layers import MtpModel

    from zoo import objectives
    from zoo.hf.convert import to_hf

    cfg, model, params, batch = _mtp_setup()
    to_hf(model, params, tmp_path / "a")
    hf = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "a", dtype=torch.float32)
    # MtpModel finds the depth by the main class's ignore patterns, which name the release's layer 61
    hf._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{cfg.num_layers}\."]
    mtp = MtpModel.from_pretrained(hf)
    ids = batch["input_ids"][:, :16]
    tokens = torch.tensor(ids, dtype=torch.long)
    with torch.no_grad():
        hidden = hf.model(tokens).last_hidden_state
        positions = torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1)
        logits = mtp._project_to_logits(mtp.forward_layer(0, hidden[:, :-1], positions[:, 1:], None,
                                                          input_ids=tokens[:, 1:])).double().numpy()
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    expected = -np.mean(np.take_along_axis(logp[:, :-1], ids[:, 2:, None], -1))
    _, aux = objectives.apply_with_aux_losses(model, params, jnp.asarray(ids))
    np.testing.assert_allclose(float(aux["mtp_loss"]), expected, rtol=1e-5)


def test_sharded_step_with_mtp_and_bias_update_matches_one_device():
    """One train step with an MTP depth and the correction-bias update, over two micro-batches, on
    data=2,fsdp=2,expert=2 of 8 devices equals the 1-device step (loss, MTP loss, load metric and
    every parameter, the correction biases exactly); the contract suite covers fsdp,expert,tensor."""
    from step_utils import assert_same_step, packed_batch, single_and_sharded_step

    if jax.device_count() < 8:
        pytest.skip("needs 8 fake CPU devices (tests/conftest.py)")
    cfg, _, _, _ = _mtp_setup()
    cfg = dataclasses.replace(cfg, bias_update_rate=0.01)
    single, sharded, _ = single_and_sharded_step(cfg, packed_batch(cfg.vocab_size, b=16), "data=2,fsdp=2,expert=2",
                                                 grad_accum=2)
    assert single[1]["mtp_loss"] > 1.0 and single[1]["router_max_load"] > 1.0
    assert_same_step(single, sharded, keys=("loss", "grad_norm", "mtp_loss", "router_max_load"))
    for name in ("layers", "mtp_0"):
        mlp = lambda p: p[name]["mlp"] if name == "layers" else p[name]["block"]["mlp"]
        np.testing.assert_array_equal(mlp(sharded[0])["correction_bias"], mlp(single[0])["correction_bias"])
        assert np.any(mlp(single[0])["correction_bias"] != 0)


def test_bfloat16_import_keeps_the_correction_bias_in_float32(tmp_path):
    """The correction bias moves by 1e-3 a step, below bfloat16's resolution near 1: a bfloat16
    import keeps it float32 (exact), every other leaf bfloat16."""
    from zoo.hf.convert import from_hf, to_hf

    cfg = zoo.config("tiny-deepseek")
    model = zoo.build(cfg)
    params = jax.device_get(nn.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]))
    bias = (1.0 + 0.001 * np.arange(cfg.moe_layers * cfg.num_experts)).astype(np.float32)
    params["layers"]["mlp"]["correction_bias"] = bias.reshape(cfg.moe_layers, cfg.num_experts)
    to_hf(model, params, tmp_path / "a")
    _, loaded = from_hf(tmp_path / "a", dtype=jnp.bfloat16)
    got = loaded["layers"]["mlp"]["correction_bias"]
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got).reshape(-1), bias)
    others = [x.dtype for path, x in jax.tree_util.tree_flatten_with_path(loaded)[0]
              if path[-1].key != "correction_bias"]
    assert set(others) == {jnp.dtype(jnp.bfloat16)}
