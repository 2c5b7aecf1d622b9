"""Mixture-of-experts decoders beyond the contract suite: auxiliary losses against PyTorch
for Mixtral and Qwen3-MoE, config switches and errors, dropless routing against a dense
per-token reference, expert parallelism in the sharded step, aux-loss metrics in training,
and mixtral-8x7b at full size (abstract parameter count, AOT compile for a TPU topology).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from safetensors.numpy import load_file, save_file

import zoo
from zoo.hf.convert import config_from_hf, config_to_hf
from zoo.hf.rules import CheckpointError
from zoo.models.moe import model as moe
from zoo.sharding import make_mesh
from zoo.training.optimizer import OptimConfig
from zoo.training.step import make_trainer

from hf_utils import model_inputs
from step_utils import shard_shapes

KINDS = ("mixtral", "qwen3_moe")


@pytest.mark.torch
@pytest.mark.parametrize("kind", KINDS)
def test_load_balancing_and_z_losses_match_torch(hf_checkpoint, kind):
    import torch

    torch_model, path = hf_checkpoint(kind)
    model, params = zoo.from_hf(path)
    cfg = model.cfg
    assert (cfg.family, cfg.hf_architecture, cfg.num_experts, cfg.num_experts_per_tok) == (
        "moe", torch_model.config.architectures[0], 4, 2)
    assert cfg.norm_topk_prob == (kind == "mixtral")
    unpadded, _, left_padded = model_inputs("decoder", seed=1)
    for inputs in (unpadded, left_padded):
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        with torch.no_grad():
            out = torch_model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                              output_router_logits=True)
        _, sown = model.apply({"params": params}, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32),
                              mutable=["aux_loss"])
        keep = mask.astype(bool)
        # HF's load_balancing_loss_func (pooled over layers, padding excluded) is the reference.
        lb = float(sown["aux_loss"]["load_balancing_loss"][0])
        np.testing.assert_allclose(lb, float(out.aux_loss), rtol=1e-5)
        # router z-loss: HF does not compute it, so recompute it from HF's own router logits
        logits_LNE = torch.stack(out.router_logits).double().numpy()[:, keep.reshape(-1)]
        lse = np.log(np.exp(logits_LNE).sum(-1))
        np.testing.assert_allclose(float(sown["aux_loss"]["router_z_loss"][0]), np.mean(lse ** 2), rtol=1e-5)


@pytest.mark.torch
@pytest.mark.parametrize("kind", KINDS)
def test_export_keeps_routing_fields(hf_checkpoint, hf_export, kind):
    import transformers

    torch_model = hf_checkpoint(kind)[0]
    reloaded = transformers.AutoConfig.from_pretrained(hf_export(kind)[2])
    for field in ("num_experts_per_tok", "router_aux_loss_coef", "hidden_size", "num_hidden_layers"):
        assert getattr(reloaded, field) == getattr(torch_model.config, field), field


@pytest.mark.torch
def test_clear_errors(hf_checkpoint, tmp_path):
    path = hf_checkpoint("qwen3_moe")[1]
    hf = json.loads((path / "config.json").read_text())
    with pytest.raises(CheckpointError, match="Qwen3MoeForCausalLM: dense layers"):
        config_from_hf({**hf, "mlp_only_layers": [1]})
    with pytest.raises(CheckpointError, match="Qwen3MoeForCausalLM: use_sliding_window"):
        config_from_hf({**hf, "use_sliding_window": True})  # the shared Llama check, renamed
    with pytest.raises(CheckpointError, match="moe_intermediate_size"):
        config_from_hf({k: v for k, v in hf.items() if k != "moe_intermediate_size"})
    mixtral = json.loads((hf_checkpoint("mixtral")[1] / "config.json").read_text())
    with pytest.raises(CheckpointError, match="router_jitter_noise"):
        config_from_hf({**mixtral, "router_jitter_noise": 0.1})
    with pytest.raises(CheckpointError, match="always renormalises"):
        config_to_hf(zoo.config("tiny-mixtral", norm_topk_prob=False))

    # a checkpoint missing one expert's tensor names it
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((path / "config.json").read_text())
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.3.up_proj.weight"]
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.1\.mlp\.experts\.3\.up_proj"):
        zoo.from_hf(broken)


# --- dropless routing ----------------------------------------------------------------------


def _dense_reference(x_ND, router_DE, w_gate, w_up, w_down, k, normalize):
    """Every expert applied to every token (float64), combined with each token's top-k weights."""
    x = x_ND.astype(np.float64)
    logits = x @ router_DE.astype(np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    combine_NE = np.zeros_like(probs)
    for n in range(x.shape[0]):
        top = np.argsort(-probs[n], kind="stable")[:k]
        combine_NE[n, top] = probs[n, top] / (probs[n, top].sum() if normalize else 1.0)
    out = np.zeros_like(x)
    for e in range(w_gate.shape[0]):
        gate, up = x @ w_gate[e], x @ w_up[e]
        expert_out = (gate / (1 + np.exp(-gate)) * up) @ w_down[e]
        out += combine_NE[:, e:e + 1] * expert_out
    return out, combine_NE


@pytest.mark.parametrize("normalize", [True, False])
def test_dropless_routing_matches_dense_reference(normalize):
    """Almost every token prefers expert 0: with a capacity (even 2x the even share) most
    would be dropped; here every token still gets exactly k experts and the exact output."""
    e, k, d, f, b, t = 8, 2, 16, 24, 4, 32
    rng = np.random.default_rng(0)
    x_BTD = rng.normal(size=(b, t, d)).astype(np.float32)
    x_BTD[..., 0] = 3.0  # feature 0 is what the router reads
    x_BTD[0, :3, 0] = -3.0  # three tokens prefer experts 6 and 7 instead
    router = rng.normal(size=(d, e)).astype(np.float32) * 0.01  # breaks ties
    router[0] += np.array([2.0, 1.0, -1.0, -1.2, -1.4, -1.6, -2.0, -2.5], np.float32)
    params = {"router": {"kernel": router},
              "gate_proj": rng.normal(size=(e, d, f)).astype(np.float32) * 0.3,
              "up_proj": rng.normal(size=(e, d, f)).astype(np.float32) * 0.3,
              "down_proj": rng.normal(size=(e, f, d)).astype(np.float32) * 0.3}
    block = moe.MoEMLP(d, f, e, k, norm_topk_prob=normalize)
    y_BTD, stats = jax.jit(lambda p, x: block.apply({"params": p}, x))(params, x_BTD)

    expected, combine_NE = _dense_reference(x_BTD.reshape(-1, d), router, params["gate_proj"], params["up_proj"],
                                            params["down_proj"], k, normalize)
    chosen_NE = combine_NE > 0
    assert np.all(chosen_NE.sum(-1) == k)  # the reference routes each token to k experts
    load_E = chosen_NE.sum(0)
    assert load_E[0] == b * t - 3 and load_E[0] > 2 * (b * t * k / e)  # far over any 2x capacity
    assert load_E[6] == load_E[7] == 3  # ... and the three others still reach their unpopular experts
    np.testing.assert_allclose(np.asarray(y_BTD).reshape(-1, d), expected, rtol=1e-5, atol=1e-5)
    # the model's own routing: k distinct experts per token, counts equal the reference's
    _, experts_Nk, _ = moe.route(jnp.asarray(x_BTD.reshape(-1, d) @ router), k, normalize)
    experts_Nk = np.asarray(experts_Nk)
    assert all(len(set(row)) == k for row in experts_Nk)
    np.testing.assert_array_equal(np.asarray(stats["expert_counts"]), load_E)
    assert float(stats["tokens"]) == b * t


# --- training -----------------------------------------------------------------------------


def test_sharded_step_splits_experts_and_adds_aux_losses(sharded_step):
    """The contract's fsdp=2,expert=2,tensor=2 step: experts really are split, and the loss
    the step minimises includes the weighted auxiliary losses."""
    cfg, single, _, start = sharded_step("moe")
    # [L, E, D, F] with E over expert, D over fsdp, F over tensor
    gate = start["params"]["layers"]["mlp"]["gate_proj"]
    assert gate.shape == (2, 4, 64, 128) and len(gate.addressable_shards) == 8
    assert shard_shapes(gate) == {(2, 2, 32, 64)}
    experts_held = {s.device.id: s.index[1] for s in gate.addressable_shards}
    assert len({(sl.start, sl.stop) for sl in experts_held.values()}) == 2  # two expert groups
    assert shard_shapes(start["params"]["layers"]["mlp"]["down_proj"]) == {(2, 2, 64, 32)}  # [L, E, F, D]
    mu = start["opt_state"][1][0].mu["layers"]["mlp"]["up_proj"]  # optimizer state too
    assert shard_shapes(mu) == {(2, 2, 32, 64)}
    assert {"loss", "nll", "grad_norm", "load_balancing_loss", "router_z_loss"} <= set(single[1])
    m1 = single[1]
    expected = m1["nll"] + cfg.router_aux_loss_coef * m1["load_balancing_loss"] + (
        cfg.router_z_loss_coef * m1["router_z_loss"])
    np.testing.assert_allclose(m1["loss"], expected, rtol=1e-6)
    assert 1.0 < m1["load_balancing_loss"] < 4.0  # ~k=2 when balanced, E*k=8 at worst


def test_load_balancing_loss_trains_the_router_only():
    """Assignment counts are piecewise constant, so the load-balancing gradient reaches the
    router through the probabilities and nothing else (the experts get none)."""
    block = moe.MoEMLP(16, 24, 4, 2)
    x_BTD = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 16))
    params = nn.unbox(block.init(jax.random.PRNGKey(0), x_BTD)["params"])

    def load_balancing(p):
        _, stats = block.apply({"params": p}, x_BTD)
        return moe.aux_losses(jax.tree.map(lambda s: s[None], stats), 4)["load_balancing_loss"]

    grads = jax.jit(jax.grad(load_balancing))(params)
    assert np.abs(np.asarray(grads["router"]["kernel"])).max() > 1e-4
    for name in ("gate_proj", "up_proj", "down_proj"):
        assert not np.any(np.asarray(grads[name])), name


def test_pretraining_reports_aux_losses_and_learns(pretrain_run):
    """The contract's `train.py --model tiny-mixtral` run: every step logs both auxiliary losses."""
    records = pretrain_run("moe")[1]
    for r in records:
        assert np.isfinite(r["load_balancing_loss"]) and r["load_balancing_loss"] > 0
        assert np.isfinite(r["router_z_loss"]) and r["router_z_loss"] >= 0
    assert records[-1]["loss"] < records[0]["loss"] - 1.0, [r["loss"] for r in records]


# --- full size ----------------------------------------------------------------------------


def test_full_size_param_counts():
    """Published totals (HF num_parameters): Mixtral 8x7B 46.70B, Qwen3-30B-A3B 30.53B, within 0.1%,
    built abstractly (jax.eval_shape: nothing allocated)."""
    for name, published in (("mixtral-8x7b", 46.70e9), ("qwen3-30b-a3b", 30.53e9)):
        count = zoo.param_count(zoo.config(name))
        assert abs(count - published) <= 1e-3 * published, (name, count)


@pytest.mark.tpu_aot
def test_mixtral_8x7b_train_step_compiles_for_tpu_with_expert_parallelism():
    """The real train step of mixtral-8x7b, AOT-compiled for 16 v5p chips from this host:
    the state is split 16 ways (params + two Adam moments in float32) and the compile
    reports per-device memory that fits a v5p's 95 GiB."""
    from jax.experimental import topologies

    devices = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x4").devices
    mesh = make_mesh("fsdp=8,expert=2", devices=devices)
    cfg = zoo.config("mixtral-8x7b")
    tr = make_trainer(cfg, mesh, OptimConfig(), batch_size=16, seq_len=256)
    memory = tr.step.memory_analysis()
    n_params = zoo.param_count(cfg)
    state_bytes = 3 * 4 * n_params  # float32 params, mu, nu
    per_device = memory.argument_size_in_bytes
    print(f"mixtral-8x7b on v5p:2x2x4 (fsdp=8, expert=2): {n_params:,} params; per device: arguments "
          f"{per_device / 2**30:.1f} GiB, temporaries {memory.temp_size_in_bytes / 2**30:.1f} GiB")
    # within 5%: TPU layouts pad small trailing dims (norm scales, the [D, E=8] router) to tiles
    assert abs(per_device - state_bytes / 16) <= 0.05 * state_bytes / 16, per_device
    assert per_device + memory.temp_size_in_bytes < 95 * 2**30
    gate = tr.abstract_state["params"]["layers"]["mlp"]["gate_proj"]  # [L, E, D, F]
    assert gate.sharding.shard_shape(gate.shape) == (32, 4, 512, 14336)


# --- GPT-OSS: MXFP4 experts, clamped SwiGLU ------------------------------------------------


def _random_mxfp4(rng, shape_param):
    """Random MXFP4 (blocks, scales) whose dequantised HF parameter has shape [E, C, R]."""
    e, c, r = shape_param
    blocks = rng.integers(0, 256, size=(e, r, c // 32, 16), dtype=np.uint8)
    scales = rng.integers(119, 124, size=(e, r, c // 32), dtype=np.uint8)  # 2**-8 .. 2**-4
    return blocks, scales


@pytest.mark.torch
def test_mxfp4_dequantizes_as_transformers():
    """Every code, both nibbles and a range of block exponents: zoo's numpy dequantisation
    equals transformers' `_convert_moe_packed_tensors` bit for bit (float32)."""
    import torch
    from transformers.integrations.mxfp4 import _convert_moe_packed_tensors

    from zoo.hf import mxfp4

    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, size=(3, 40, 4, 16), dtype=np.uint8)
    blocks[0, 0, 0] = np.arange(0, 256, 16, dtype=np.uint8) + np.arange(16, dtype=np.uint8)  # all 16 codes twice
    scales = rng.integers(100, 140, size=(3, 40, 4), dtype=np.uint8)
    ours = mxfp4.dequantize(blocks, scales)
    theirs = _convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales),
                                         dtype=torch.float32).numpy()
    assert ours.shape == theirs.shape == (3, 128, 40)
    np.testing.assert_array_equal(ours, theirs)
    assert set(np.unique(np.abs(ours[0, :32, 0]) / 2.0 ** (int(scales[0, 0, 0]) - 127))) == \
        {0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0}
    with pytest.raises(ValueError, match="do not pair"):
        mxfp4.dequantize(blocks, scales[:, :, :3])


@pytest.mark.torch
def test_mxfp4_checkpoint_imports_and_exports_unquantized(tmp_path):
    """A GPT-OSS checkpoint with MXFP4 experts (`*_blocks`/`*_scales`, quantization_config
    mxfp4): logits equal PyTorch's on the dequantised weights; the export is unquantised
    (gate_up_proj / down_proj, no quantization_config) and transformers loads it."""
    import torch
    import transformers
    from transformers.integrations.mxfp4 import _convert_moe_packed_tensors

    from hf_utils import make_model, save, torch_logits

    hf = make_model("gpt_oss", intermediate_size=64)  # in and out sizes multiples of 32
    e, d, f = 4, 64, 64
    rng = np.random.default_rng(1)
    packed = {}
    with torch.no_grad():
        for i, layer in enumerate(hf.model.layers):
            for name, shape in (("gate_up_proj", (e, d, 2 * f)), ("down_proj", (e, f, d))):
                blocks, scales = _random_mxfp4(rng, shape)
                weight = _convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales),
                                                     dtype=torch.float32)
                getattr(layer.mlp.experts, name).copy_(weight)
                packed[f"model.layers.{i}.mlp.experts.{name}"] = (blocks, scales)
    save(hf, tmp_path / "float")
    tensors = load_file(tmp_path / "float" / "model.safetensors")
    for key, (blocks, scales) in packed.items():
        del tensors[key]
        tensors[key + "_blocks"], tensors[key + "_scales"] = blocks, scales
    quantized = tmp_path / "mxfp4"
    quantized.mkdir()
    save_file(tensors, quantized / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tmp_path / "float" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["router", "lm_head"]}
    (quantized / "config.json").write_text(json.dumps(config))

    model, params = zoo.from_hf(quantized)
    ids, mask = model_inputs("decoder", seed=2)[-1].values()
    want = torch_logits(hf, ids, mask)
    got = np.asarray(model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)))
    real = mask.astype(bool)
    assert float(np.abs(got - want)[real].max()) <= 1e-4

    zoo.to_hf(model, params, tmp_path / "export")
    written = load_file(tmp_path / "export" / "model.safetensors")
    assert not any(k.endswith(("_blocks", "_scales")) for k in written)
    np.testing.assert_array_equal(written["model.layers.1.mlp.experts.down_proj"],
                                  hf.model.layers[1].mlp.experts.down_proj.detach().numpy())
    assert "quantization_config" not in json.loads((tmp_path / "export" / "config.json").read_text())
    reloaded = transformers.GptOssForCausalLM.from_pretrained(tmp_path / "export").eval()
    np.testing.assert_array_equal(torch_logits(reloaded, ids, mask), want)

    # a mis-shaped pair is refused from its header, before dequantising; a blocks tensor without
    # its scales is named
    key = "model.layers.0.mlp.experts.down_proj"
    good = tensors[key + "_blocks"], tensors[key + "_scales"]
    tensors[key + "_blocks"], tensors[key + "_scales"] = good[0][:, :32], good[1][:, :32]
    save_file(tensors, quantized / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"down_proj_blocks.*shape \(4, 64, 32\), expected \(4, 64, 64\)"):
        zoo.from_hf(quantized)
    tensors[key + "_blocks"] = good[0]
    del tensors[key + "_scales"]
    save_file(tensors, quantized / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="down_proj_blocks.*has no.*down_proj_scales"):
        zoo.from_hf(quantized)


def test_clamped_swiglu_clamps_gate_above_and_up_both_ways():
    glu = moe.clamped_swiglu(alpha=1.702, limit=7.0)
    gate = jnp.asarray([-10.0, 0.0, 3.0, 9.0])
    up = jnp.asarray([-9.0, 1.0, 8.0, -2.0])
    g = np.minimum(np.asarray(gate), 7.0)
    want = (np.clip(np.asarray(up), -7.0, 7.0) + 1.0) * g / (1.0 + np.exp(-1.702 * g))
    np.testing.assert_allclose(np.asarray(glu(gate, up)), want, rtol=1e-6)
