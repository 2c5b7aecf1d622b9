"""T5: relative-position buckets, parity with PyTorch for v1.0 (ReLU, tied + scaled head)
and v1.1 (gated GELU; tied-unscaled as transformers 5 saves it, and truly untied),
HF round trips, presets, bad inputs.

Tests that need torch + transformers carry the `torch` mark (imported inside them).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from zoo.models.t5.model import relative_position_buckets

VOCAB = 256
VARIANTS = ("v1.0", "v1.1", "v1.1-untied")


def _hf_t5(variant: str, seed: int = 0):
    """A seeded tiny random HF T5ForConditionalGeneration (eager, eval), weights redrawn larger.

    Few buckets and a short max_distance so that short test sequences reach the
    logarithmic buckets; the decoder is deeper than the encoder to catch mix-ups.
    """
    import torch
    import transformers

    gated = variant != "v1.0"
    config = transformers.T5Config(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=96, num_layers=2,
                                   num_decoder_layers=3, num_heads=4, relative_attention_num_buckets=12,
                                   relative_attention_max_distance=20,
                                   feed_forward_proj="gated-gelu" if gated else "relu",
                                   tie_word_embeddings=not gated, decoder_start_token_id=0)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.T5ForConditionalGeneration(config).float().eval()
    with torch.no_grad():
        if variant == "v1.1-untied":  # transformers 5 always ties; untie by hand as Flan-T5 checkpoints are
            model.lm_head.weight = torch.nn.Parameter(torch.empty_like(model.shared.weight))
            model.config.tie_word_embeddings = False
        for name, p in model.named_parameters():
            base = 1.0 if name.endswith("layer_norm.weight") else 0.0
            p.copy_(torch.randn_like(p) * (0.1 if p.ndim == 1 else 0.15) + base)
    return model


def _batch(seed: int = 0):
    """Encoder ids [3, 11] and decoder ids [3, 9], both right-padded per row."""
    rng = np.random.default_rng(seed)
    ids, dec = rng.integers(2, VOCAB, size=(3, 11)), rng.integers(2, VOCAB, size=(3, 9))
    mask, dec_mask = np.ones_like(ids), np.ones_like(dec)
    mask[1, 7:], mask[2, 4:], dec_mask[1, 5:], dec_mask[2, 2:] = 0, 0, 0, 0
    return ids, mask, dec, dec_mask


def _torch_logits(model, ids, mask, dec, dec_mask):
    import torch

    t = torch.from_numpy
    with torch.no_grad():
        return model(input_ids=t(ids), attention_mask=t(mask), decoder_input_ids=t(dec),
                     decoder_attention_mask=t(dec_mask)).logits.numpy()


@pytest.mark.torch
@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets, max_distance", [(32, 128), (12, 20)])
def test_relative_position_buckets_match_hf(bidirectional, num_buckets, max_distance):
    import torch
    from transformers.models.t5.modeling_t5 import T5Attention

    q, k = 300, 300
    offsets = torch.arange(k)[None, :] - torch.arange(q)[:, None]
    expected = T5Attention._relative_position_bucket(offsets, bidirectional=bidirectional, num_buckets=num_buckets,
                                                     max_distance=max_distance).numpy()
    ours = relative_position_buckets(q, k, bidirectional=bidirectional, num_buckets=num_buckets,
                                     max_distance=max_distance)
    np.testing.assert_array_equal(ours, expected)


@pytest.mark.torch
@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_pytorch_with_padding(variant, tmp_path):
    hf = _hf_t5(variant)
    hf.save_pretrained(tmp_path)
    model, params = zoo.from_hf(tmp_path)
    cfg = model.cfg
    assert cfg.num_layers == 2 and cfg.num_decoder_layers == 3
    assert cfg.feed_forward_proj == ("relu" if variant == "v1.0" else "gated-gelu")
    assert cfg.scale_decoder_outputs == (variant == "v1.0")
    assert cfg.tie_word_embeddings == (variant != "v1.1-untied")
    ids, mask, dec, dec_mask = _batch()
    expected = _torch_logits(hf, ids, mask, dec, dec_mask)
    ours = model.apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask),
                       decoder_input_ids=jnp.asarray(dec), decoder_attention_mask=jnp.asarray(dec_mask))
    assert ours.shape == expected.shape == (3, 9, VOCAB)
    # Every position, padded ones included: masks hide keys only, as in PyTorch.
    np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-4, rtol=0)


@pytest.mark.torch
@pytest.mark.parametrize("variant", VARIANTS)
def test_round_trip_bit_exact_and_reloadable(variant, tmp_path):
    import transformers
    from safetensors.numpy import load_file

    hf = _hf_t5(variant, seed=1)
    hf.save_pretrained(tmp_path / "hf")
    original = load_file(tmp_path / "hf" / "model.safetensors")
    assert ("lm_head.weight" in original) == (variant == "v1.1-untied")
    model, params = zoo.from_hf(tmp_path / "hf")
    zoo.to_hf(model, params, tmp_path / "zoo")
    written = load_file(tmp_path / "zoo" / "model.safetensors")
    assert set(written) == set(original)
    for key, value in written.items():
        assert value.dtype == original[key].dtype and np.array_equal(value, original[key]), key

    reloaded = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "zoo",
                                                                      attn_implementation="eager").eval()
    assert reloaded.config.scale_decoder_outputs == hf.config.scale_decoder_outputs
    batch = _batch(seed=3)
    np.testing.assert_array_equal(_torch_logits(reloaded, *batch), _torch_logits(hf, *batch))
    again_model, again = zoo.from_hf(tmp_path / "zoo")
    assert again_model.cfg.replace(name="x") == model.cfg.replace(name="x")
    jax.tree.map(np.testing.assert_array_equal, again, params)


@pytest.mark.torch
@pytest.mark.parametrize("kind", ["missing", "unexpected", "shape", "truncated"])  # hf_utils.TENSOR_DAMAGE
def test_damaged_checkpoint_errors_name_file_and_tensor(kind, tmp_path):
    from hf_utils import check_damaged_checkpoint

    _hf_t5("v1.1-untied").save_pretrained(tmp_path / "hf")
    check_damaged_checkpoint(tmp_path / "hf", tmp_path, kind, "decoder.block.2.layer.1.EncDecAttention.k.weight")


@pytest.mark.torch
def test_to_hf_is_atomic(tmp_path, monkeypatch):
    from hf_utils import check_to_hf_is_atomic

    _hf_t5("v1.1-untied").save_pretrained(tmp_path / "hf")
    model, params = zoo.from_hf(tmp_path / "hf")
    check_to_hf_is_atomic(model, params, tmp_path, monkeypatch)


@pytest.mark.parametrize("name, count", [("t5-small", 60_506_624), ("t5-base", 222_903_552),
                                         ("t5-large", 737_668_096), ("flan-t5-base", 247_577_856)])
def test_full_size_parameter_counts(name, count):
    """Published counts (HF num_parameters of the hub checkpoints), within 0.1%."""
    assert abs(zoo.param_count(zoo.config(name)) - count) <= 1e-3 * count


def test_every_param_has_logical_axes_and_bias_table_is_unscanned():
    for name in ("tiny-t5", "tiny-t5-v1.1", "t5-base"):
        cfg = zoo.config(name)
        boxed = zoo.abstract_params(cfg)
        leaves = jax.tree.leaves(boxed, is_leaf=lambda x: hasattr(x, "names"))
        assert leaves and all(hasattr(x, "names") and len(x.names) == x.value.ndim for x in leaves), name
        for stack, depth in (("encoder", cfg.num_layers), ("decoder", cfg.num_decoder_layers)):
            table = boxed[stack]["relative_attention_bias"]
            assert table.names == ("relpos_buckets", "heads")
            assert boxed[stack]["layers"]["self_attn"]["q_proj"]["kernel"].value.shape[0] == depth
        assert ("lm_head" in boxed) == (not cfg.tie_word_embeddings)


def _tiny(name="tiny-t5", **overrides):
    cfg = zoo.config(name, **overrides)
    model = zoo.build(cfg)
    ids = jnp.asarray(np.random.default_rng(0).integers(2, cfg.vocab_size, size=(2, 10)))
    return cfg, model, model.init(jax.random.key(0), ids)["params"], ids


def test_padding_invariance_and_causality():
    cfg, model, params, ids = _tiny()
    dec = jnp.asarray(np.random.default_rng(1).integers(2, cfg.vocab_size, size=(2, 6)))
    mask = jnp.asarray([[1] * 10, [1] * 7 + [0] * 3])
    out = model.apply({"params": params}, ids, mask, dec)
    assert out.shape == (2, 6, cfg.vocab_size) and out.dtype == jnp.float32
    # Padded encoder tokens are invisible; future decoder tokens are invisible.
    other = model.apply({"params": params}, ids.at[1, 7:].set(5), mask, dec.at[:, 4:].set(9))
    np.testing.assert_allclose(np.asarray(out[1, :4]), np.asarray(other[1, :4]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(out[0, :4]), np.asarray(other[0, :4]), atol=1e-5)
    assert not np.allclose(np.asarray(out[0, 4:]), np.asarray(other[0, 4:]), atol=1e-3)


def test_cross_attention_through_the_fused_kernel_matches_xla():
    """attention_impl="pallas" runs cross-attention in the Pallas kernel (interpret mode on
    CPU) while biased self-attention stays on "xla" explicitly: same logits."""
    cfg, model, params, ids = _tiny()
    mask = jnp.asarray([[1] * 10, [1] * 6 + [0] * 4])
    dec = ids[:, :8]
    ref = model.apply({"params": params}, ids, mask, dec)
    fused = zoo.build(cfg.replace(attention_impl="pallas")).apply({"params": params}, ids, mask, dec)
    np.testing.assert_allclose(np.asarray(fused), np.asarray(ref), atol=2e-5)


def test_clear_errors_on_bad_input():
    cfg, model, params, ids = _tiny("tiny-t5-v1.1")
    apply = lambda *a, **k: model.apply({"params": params}, *a, **k)
    with pytest.raises(ValueError, match="integer"):
        apply(ids.astype(jnp.float32))
    with pytest.raises(ValueError, match="attention_mask must have the shape"):
        apply(ids, jnp.ones((2, 3), jnp.int32))
    with pytest.raises(ValueError, match="decoder_attention_mask must have the shape"):
        apply(ids, decoder_input_ids=ids[:, :4], decoder_attention_mask=jnp.ones((2, 5), jnp.int32))
    with pytest.raises(ValueError, match="batch"):
        apply(ids, decoder_input_ids=ids[:1])
    with pytest.raises(ValueError, match="both segment_ids and decoder_segment_ids"):
        apply(ids, segment_ids=jnp.ones_like(ids))
    with pytest.raises(ValueError, match="feed_forward_proj"):
        cfg.replace(feed_forward_proj="gated-silu")
    with pytest.raises(ValueError, match="grouped-query"):
        cfg.replace(num_kv_heads=2)


# --- span corruption through the one train step -------------------------------------------


def _invert(s, b, first_sentinel):
    """Per document of row b: the encoder input with every sentinel replaced by its targets."""
    enc, enc_seg = np.asarray(s["input_ids"][b]), np.asarray(s["segment_ids"][b])
    tgt, dec_seg = np.asarray(s["targets"][b]), np.asarray(s["decoder_segment_ids"][b])
    docs = {}
    for d in sorted(set(enc_seg[enc_seg > 0])):
        pieces, sentinel, spans = [], None, {}
        for tok in tgt[dec_seg == d]:
            if tok > first_sentinel - 100:
                sentinel = int(tok)
                spans[sentinel] = []
            else:
                spans[sentinel].append(int(tok))
        assert list(spans) == list(range(first_sentinel, first_sentinel - len(spans), -1))  # restart per document
        for tok in enc[enc_seg == d]:
            pieces += spans.pop(int(tok)) if tok > first_sentinel - 100 else [int(tok)]
        assert not spans
        docs[int(d)] = pieces
    return docs


def test_span_corruption_is_invertible_with_t5_statistics():
    from zoo.objectives import span_corruption

    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(4, 400, size=(32, 256)))
    seg = np.zeros((32, 256), np.int32)
    for b in range(32):  # packed rows: a few documents, then padding
        cuts = np.sort(rng.choice(np.arange(20, 230), size=3, replace=False))
        seg[b, :cuts[0]], seg[b, cuts[0]:cuts[1]], seg[b, cuts[1]:cuts[2]] = 1, 2, 3
    s = span_corruption(ids, jnp.asarray(seg), jax.random.key(0), first_sentinel_id=511, decoder_start_id=0)
    noise = spans = real = 0
    for b in range(32):
        docs = _invert(s, b, 511)
        for d, tokens in docs.items():
            assert tokens == list(np.asarray(ids[b])[seg[b] == d])
        tgt = np.asarray(s["targets"][b])[np.asarray(s["decoder_segment_ids"][b]) > 0]
        spans += int((tgt > 411).sum())
        noise += int((tgt <= 411).sum())
        real += int((seg[b] > 0).sum())
    assert abs(noise / real - 0.15) < 0.02
    assert 2.5 < noise / spans < 3.5  # documents cut some spans in two


def test_span_decoder_inputs_are_targets_shifted_within_documents():
    from zoo.objectives import span_corruption

    ids = jnp.arange(10, 74)[None]
    seg = jnp.asarray([[1] * 30 + [2] * 30 + [0] * 4])
    s = {k: np.asarray(v[0]) for k, v in span_corruption(ids, seg, jax.random.key(5), first_sentinel_id=99,
                                                        decoder_start_id=0, noise_density=0.3).items()}
    for i in np.flatnonzero(s["decoder_segment_ids"] > 0):
        first = i == 0 or s["decoder_segment_ids"][i - 1] != s["decoder_segment_ids"][i]
        assert s["decoder_input_ids"][i] == (0 if first else s["targets"][i - 1])


def test_train_script_span_on_embedded_corpus_loss_falls(tmp_path):
    """Acceptance, small mode: `train.py --model tiny-t5 --objective span` on the stdlib corpus."""
    import train

    result = train.main(["--model", "tiny-t5", "--objective", "span", "--steps", "40", "--seq-len", "64",
                         "--batch-size", "8", "--lr", "3e-3", "--data-max-bytes", "300000", "--out",
                         str(tmp_path), "--no-progress", "--checkpoint-every", "40"])
    losses = result["losses"]
    assert len(losses) == 40 and np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 fake CPU devices (tests/conftest.py)")
def test_sharded_span_step_matches_single_device():
    """The same step on data=2,fsdp=2,tensor=2 (params really split) as on one device."""
    from step_utils import assert_same_step, packed_batch, shard_shapes, single_and_sharded_step

    cfg = zoo.config("tiny-t5")
    single, sharded, start = single_and_sharded_step(cfg, packed_batch(cfg.vocab_size), "data=2,fsdp=2,tensor=2", objective="span")
    params = start["params"]
    assert shard_shapes(params["encoder"]["layers"]["mlp"]["fc_in"]["kernel"]) == {(2, 32, 64)}  # [L, D, F]: embed->fsdp, mlp->tensor
    assert shard_shapes(params["decoder"]["layers"]["cross_attn"]["q_proj"]["kernel"]) == {(2, 32, 2, 16)}  # [L, D, N, H]: heads->tensor
    assert_same_step(single, sharded)


@pytest.mark.torch
@pytest.mark.parametrize("variant", ["v1.0", "v1.1-untied"])
def test_greedy_generate_matches_hf(variant, tmp_path):
    """zoo.generate on T5: input_ids feed the encoder; greedy tokens equal HF's generate."""
    import torch

    hf = _hf_t5(variant, seed=4)
    hf.save_pretrained(tmp_path)
    model, params = zoo.from_hf(tmp_path)
    ids, mask, _, _ = _batch(seed=5)
    with torch.no_grad():
        expected = hf.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                               max_new_tokens=8, do_sample=False,
                               use_cache=False).numpy()[:, 1:]  # (HF's cache assumes equal depths); drop start
    ours = np.asarray(zoo.generate(model, params, ids, mask, max_new_tokens=8))
    assert ours.shape == (3, 8)
    np.testing.assert_array_equal(ours[:, :expected.shape[1]], expected)
    assert (ours[:, expected.shape[1]:] == 0).all()  # HF stops early only when every row hit eos


@pytest.mark.torch
@pytest.mark.parametrize("name", ["t5-small", "t5-base", "t5-large"])
def test_hf_config_builds_same_param_count(name):
    """config_to_hf checked by transformers itself (meta device). Untied presets (flan-t5-base)
    are left out: transformers 5 always ties the T5 head when it builds from a config."""
    import torch
    import transformers

    import zoo.hf

    cfg = zoo.config(name)
    hf = zoo.hf.config_to_hf(cfg)
    with torch.device("meta"):
        model = getattr(transformers, hf["architectures"][0])(transformers.AutoConfig.for_model(**hf))
    assert sum(p.numel() for p in model.parameters()) == zoo.param_count(cfg), name
