"""zoo.generate: KV-cache decoding equals transformers' greedy generate; sampling
follows the documented distributions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from zoo.inference import sample_logits

import hf_utils


def _prompts(vocab, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, (3, 12)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[0, :5] = 0  # prompts of different lengths, left padded as HF expects
    mask[1, :2] = 0
    ids[mask == 0] = 0
    return ids, mask


def _hf_model(family, tmp_path):
    import torch
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=128, max_position_embeddings=128)
    if family == "gpt2":
        cfg = tf.GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128)
        model = tf.GPT2LMHeadModel(cfg)
    elif family == "llama":
        cfg = tf.LlamaConfig(num_key_value_heads=2, **common)
        model = tf.LlamaForCausalLM(cfg)
    else:
        cfg = tf.MistralConfig(num_key_value_heads=2, sliding_window=8, **common)
        model = tf.MistralForCausalLM(cfg)
    # Sharper logits than the 0.02-std init, so greedy choices are far from ties.
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(8.0)
    model.eval()
    model.save_pretrained(tmp_path)
    return model


@pytest.mark.torch
@pytest.mark.parametrize("family", ["gpt2", "llama", "mistral", "gemma2", "gemma3", "olmo2", "smollm3",
                                    "phi3", "phi3-longrope", "gpt_oss", "llama4", "llama4-maverick", "deepseek_v3",
                                    "deepseek_v2"])
def test_greedy_matches_transformers(family, tmp_path):
    """Left-padded prompts, 32 new tokens: longer than every sliding window and attention chunk of
    the checkpoints (tests/hf_utils.py), so the cache's windowed and chunked decoding and per-layer
    kinds are exercised."""
    import torch

    if family in hf_utils.CHECKPOINTS:
        hf = hf_utils.make_model(family)
        hf_utils.save(hf, tmp_path)
    else:
        hf = _hf_model(family, tmp_path)
    model, params = zoo.from_hf(tmp_path)
    ids, mask = _prompts(256)
    with torch.no_grad():
        ref = hf.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=32, do_sample=False,
                          min_new_tokens=32, pad_token_id=0, eos_token_id=None)
    ref = ref[:, ids.shape[1]:].numpy()
    ours = np.asarray(zoo.generate(model, params, ids, mask, max_new_tokens=32))
    np.testing.assert_array_equal(ours, ref)


def _tiny_llama():
    from flax import linen as nn

    cfg = zoo.config("tiny-llama")
    model = zoo.build(cfg)
    params = nn.unbox(model.init(jax.random.key(0), jnp.ones((1, 4), jnp.int32))["params"])
    params = jax.tree.map(lambda x: x * 8 if x.ndim > 2 else x, params)
    return model, params


def test_sampling_top_k1_is_greedy_and_seeded_sampling_reproducible():
    model, params = _tiny_llama()
    ids, mask = _prompts(model.cfg.vocab_size, seed=1)
    greedy = np.asarray(zoo.generate(model, params, ids, mask, max_new_tokens=16))
    top1 = np.asarray(zoo.generate(model, params, ids, mask, max_new_tokens=16, temperature=1.0, top_k=1, seed=5))
    np.testing.assert_array_equal(greedy, top1)
    a = np.asarray(zoo.generate(model, params, ids, mask, max_new_tokens=16, temperature=1.0, seed=3))
    b = np.asarray(zoo.generate(model, params, ids, mask, max_new_tokens=16, temperature=1.0, seed=3))
    c = np.asarray(zoo.generate(model, params, ids, mask, max_new_tokens=16, temperature=1.0, seed=4))
    np.testing.assert_array_equal(a, b)
    assert (a != c).any(), "different seeds should sample different continuations"


def test_right_padded_prompts_equal_left_padded_and_num_return_sequences():
    model, params = _tiny_llama()
    ids, mask = _prompts(model.cfg.vocab_size, seed=2)
    left = np.asarray(zoo.generate(model, params, ids, mask, max_new_tokens=8))
    right_ids, right_mask = np.zeros_like(ids), np.zeros_like(mask)
    for r in range(ids.shape[0]):
        toks = ids[r][mask[r] > 0]
        right_ids[r, :len(toks)], right_mask[r, :len(toks)] = toks, 1
    right = np.asarray(zoo.generate(model, params, right_ids, right_mask, max_new_tokens=8))
    np.testing.assert_array_equal(left, right)
    rep = np.asarray(zoo.generate(model, params, ids, mask, max_new_tokens=8, num_return_sequences=2))
    assert rep.shape == (6, 8)
    np.testing.assert_array_equal(rep[::2], left)


def test_stop_tokens_pad_the_rest():
    model, params = _tiny_llama()
    ids, mask = _prompts(model.cfg.vocab_size, seed=3)
    free = np.asarray(zoo.generate(model, params, ids, mask, max_new_tokens=12))
    stop = int(free[0, 3])
    out = np.asarray(zoo.generate(model, params, ids, mask, max_new_tokens=12, stop_tokens=[stop], pad_id=0))
    for row_free, row in zip(free, out):
        hits = np.flatnonzero(row_free == stop)
        if hits.size:
            k = hits[0]
            np.testing.assert_array_equal(row[: k + 1], row_free[: k + 1])
            assert (row[k + 1:] == 0).all()
        else:
            np.testing.assert_array_equal(row, row_free)


def test_bad_prompt_token_is_a_clear_error():
    model, params = _tiny_llama()
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        zoo.generate(model, params, np.array([[1, 2, model.cfg.vocab_size]]), max_new_tokens=2)


def test_an_encoder_does_not_generate():
    """The family record says BERT is an encoder: generate refuses it by name, before any compile."""
    model = zoo.build(zoo.config("tiny-bert"))
    with pytest.raises(ValueError, match="tiny-bert: bert is an encoder model; it does not generate text"):
        zoo.generate(model, {}, np.array([[1, 2, 3]]), max_new_tokens=2)


def _empirical(logits, n, **kw):
    keys = jax.random.split(jax.random.key(0), n)
    toks = jax.vmap(lambda k: sample_logits(logits[None], k, **kw)[0])(keys)
    return np.bincount(np.asarray(toks), minlength=logits.shape[-1]) / n


def test_temperature_and_top_p_distributions():
    logits = jnp.array([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    n = 40000
    for temp in (0.5, 1.0, 2.0):
        expected = np.asarray(jax.nn.softmax(logits / temp))
        got = _empirical(logits, n, temperature=temp, top_k=None, top_p=None)
        # 5 standard errors of a binomial proportion
        tol = 5 * np.sqrt(expected * (1 - expected) / n) + 1e-3
        assert np.all(np.abs(got - expected) <= tol), (temp, got, expected)
    # top_p=0.8: the nucleus is the smallest prefix with mass >= 0.8, renormalised
    probs = np.asarray(jax.nn.softmax(logits))
    keep = np.cumsum(probs) - probs < 0.8
    nucleus = np.where(keep, probs, 0) / probs[keep].sum()
    got = _empirical(logits, n, temperature=1.0, top_k=None, top_p=0.8)
    assert got[~keep].sum() == 0
    assert np.all(np.abs(got - nucleus) <= 5 * np.sqrt(nucleus * (1 - nucleus) / n) + 1e-3)
    got = _empirical(logits, n, temperature=1.0, top_k=2, top_p=None)
    assert got[2:].sum() == 0 and abs(got[0] - probs[0] / probs[:2].sum()) < 0.02
