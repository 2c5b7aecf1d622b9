"""Gemma 2 / Gemma 3 specifics beyond the contract suite: the per-layer attention kinds follow
transformers' layer pattern, the soft caps bound what they cap, and the full-size presets'
train steps AOT-compile for TPU slices with the local/global switch inside the layer scan."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import zoo
from zoo.training.plan import plan


@pytest.mark.torch
@pytest.mark.parametrize("preset, hf_config", [("gemma2-9b", "Gemma2Config"), ("gemma3-27b", "Gemma3TextConfig")])
def test_layer_kinds_follow_transformers_pattern(preset, hf_config):
    import transformers

    cfg = zoo.config(preset)
    hf = getattr(transformers, hf_config)(num_hidden_layers=cfg.num_layers)
    assert list(cfg.layer_types) == list(hf.layer_types)
    kinds, ids = cfg.attention_kinds()
    for layer_type, i in zip(hf.layer_types, ids):
        window, theta, scaling, chunk = kinds[i]
        assert chunk is None
        if layer_type == "sliding_attention":
            assert window == cfg.sliding_window
            assert (theta, scaling) == (10_000.0, None)  # Gemma 3: its local base, never scaled
        else:
            assert window is None
            assert (theta, scaling) == ((1_000_000.0, (8.0,)) if preset.startswith("gemma3") else (10_000.0, None))
    assert len(kinds) == 2


def test_final_logit_soft_cap_bounds_logits():
    cfg = zoo.config("tiny-gemma2")
    model = zoo.build(cfg)
    ids = jnp.arange(24, dtype=jnp.int32).reshape(2, 12)
    params = nn.unbox(model.init(jax.random.key(0), ids)["params"])
    params = jax.tree.map(lambda x: x * 50.0, params)  # logits far beyond the cap without it
    logits = np.asarray(model.apply({"params": params}, ids))
    uncapped = np.asarray(zoo.build(cfg.replace(final_logit_softcap=None)).apply({"params": params}, ids))
    assert np.abs(uncapped).max() > 5 * cfg.final_logit_softcap
    assert np.abs(logits).max() < cfg.final_logit_softcap
    c = cfg.final_logit_softcap
    np.testing.assert_allclose(logits, c * np.tanh(uncapped / c), rtol=1e-5, atol=1e-5)


@pytest.mark.tpu_aot
@pytest.mark.main_leg
@pytest.mark.parametrize("preset, topology", [("gemma3-1b", "v5e:2x2")])
def test_full_size_train_step_compiles_for_tpu_and_fits(preset, topology):
    """One preset in CI (the local/global switch and q/k norms in the scanned step); every new
    full-size preset is compiled by `python -m benchmarks.plan --table` (README's plan table)."""
    r = plan(zoo.config(preset, remat="full"), topology, batch_size=4, seq_len=4096)
    print(f"{preset} on {topology}: {r['hbm_bytes'] / 2**30:.1f} GiB of {r['capacity_bytes'] / 2**30:.0f} per device")
    assert r["status"] == "compiled" and r["fits"], r.get("message")


@pytest.mark.torch
def test_gemma3_multimodal_checkpoint_imports_its_text_tower(tmp_path):
    """Gemma3ForConditionalGeneration (how Gemma 3 4B+ ship): the text tower imports as a
    Gemma3ForCausalLM whose logits on text equal the multimodal model's; the vision tower and
    projector are left out; the export is a Gemma3ForCausalLM transformers loads."""
    import torch
    import transformers

    from hf_utils import check_text_tower_import

    text = dict(vocab_size=300, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
                head_dim=32, intermediate_size=128, max_position_embeddings=128, sliding_window=5,
                query_pre_attn_scalar=24, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                                 "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}})
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                       image_token_index=299, boi_token_index=297, eoi_token_index=298)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = transformers.Gemma3ForConditionalGeneration(config).float().eval()
    with torch.no_grad():
        for key, p in hf.named_parameters():
            p.copy_(torch.randn_like(p) * (0.1 if p.ndim == 1 else 0.08))
    check_text_tower_import(hf, hf, "Gemma3ForCausalLM", 3, tmp_path)
