"""T5 beyond the contract suite: relative-position buckets, what v1.0 (ReLU, tied + scaled
head) and v1.1 (gated GELU; tied-unscaled as transformers 5 saves it, and truly untied)
import as, greedy generation against HF, masks and causality, bad inputs, span corruption.

Tests that need torch + transformers carry the `torch` mark (imported inside them).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import zoo
from zoo.models.t5.model import relative_position_buckets
from zoo.objectives import span_corruption

from hf_utils import make_model, model_inputs, save
from step_utils import shard_shapes

VARIANTS = ("t5-v1.0", "t5-v1.1", "t5-v1.1-untied")


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
def test_variants_import_and_export_their_switches(hf_checkpoint, hf_export, variant):
    """Depths, feed-forward, head scaling and tying as the checkpoint has them, and back."""
    hf, path = hf_checkpoint(variant)
    cfg = zoo.from_hf(path)[0].cfg
    assert cfg.num_layers == 2 and cfg.num_decoder_layers == 3
    assert cfg.feed_forward_proj == ("relu" if variant == "t5-v1.0" else "gated-gelu")
    assert cfg.scale_decoder_outputs == (variant == "t5-v1.0")
    assert cfg.tie_word_embeddings == (variant != "t5-v1.1-untied")
    assert ("lm_head.weight" in load_file(path / "model.safetensors")) == (variant == "t5-v1.1-untied")

    import transformers

    reloaded = transformers.T5ForConditionalGeneration.from_pretrained(hf_export(variant)[2])
    assert reloaded.config.scale_decoder_outputs == hf.config.scale_decoder_outputs


@pytest.mark.parametrize("name, count", [("t5-small", 60_506_624), ("t5-base", 222_903_552),
                                         ("t5-large", 737_668_096), ("flan-t5-base", 247_577_856)])
def test_full_size_parameter_counts(name, count):
    """Published counts (HF num_parameters of the hub checkpoints), within 0.1%."""
    assert abs(zoo.param_count(zoo.config(name)) - count) <= 1e-3 * count


def test_bias_table_is_unscanned_and_head_follows_tying():
    for name in ("tiny-t5", "tiny-t5-v1.1", "t5-base"):
        cfg = zoo.config(name)
        boxed = zoo.abstract_params(cfg)
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
    ids = jnp.arange(10, 74)[None]
    seg = jnp.asarray([[1] * 30 + [2] * 30 + [0] * 4])
    s = {k: np.asarray(v[0]) for k, v in span_corruption(ids, seg, jax.random.key(5), first_sentinel_id=99,
                                                        decoder_start_id=0, noise_density=0.3).items()}
    for i in np.flatnonzero(s["decoder_segment_ids"] > 0):
        first = i == 0 or s["decoder_segment_ids"][i - 1] != s["decoder_segment_ids"][i]
        assert s["decoder_input_ids"][i] == (0 if first else s["targets"][i - 1])


def test_sharded_span_step_splits_params(sharded_step):
    """The contract's data=2,fsdp=2,tensor=2 step: how T5's weights are split."""
    params = sharded_step("t5")[3]["params"]
    # [L, D, F]: embed->fsdp, mlp->tensor; [L, D, N, H]: heads->tensor
    assert shard_shapes(params["encoder"]["layers"]["mlp"]["fc_in"]["kernel"]) == {(2, 32, 64)}
    assert shard_shapes(params["decoder"]["layers"]["cross_attn"]["q_proj"]["kernel"]) == {(2, 32, 2, 16)}


@pytest.mark.torch
@pytest.mark.parametrize("variant", ["t5-v1.0", "t5-v1.1-untied", "mt5", "umt5"])
def test_greedy_generate_matches_hf(variant, tmp_path):
    """zoo.generate on T5, mT5 and UMT5: input_ids feed the encoder (here left-padded);
    20 greedy tokens equal HF's generate."""
    import torch

    hf = make_model(variant, seed=4)
    save(hf, tmp_path)
    model, params = zoo.from_hf(tmp_path)
    inputs = model_inputs("encoder-decoder", seed=5)[0]
    ids, mask = inputs["input_ids"], np.ones_like(inputs["attention_mask"])
    mask[1, :4], mask[2, :7] = 0, 0
    with torch.no_grad():
        expected = hf.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                               max_new_tokens=20, do_sample=False,
                               use_cache=False).numpy()[:, 1:]  # (HF's cache assumes equal depths); drop start
    ours = np.asarray(zoo.generate(model, params, ids, mask, max_new_tokens=20))
    assert ours.shape == (3, 20)
    np.testing.assert_array_equal(ours[:, :expected.shape[1]], expected)
    assert (ours[:, expected.shape[1]:] == 0).all()  # HF stops early only when every row hit eos
