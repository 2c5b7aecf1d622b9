"""train.py: the shared sharded step (same numbers on 8 devices as on 1), exact resume,
no attention across packed documents, the script end to end, and its flag checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import train
import zoo
from zoo import data, objectives
from zoo.sharding import make_mesh
from zoo.training import finetune, plan, pretrain
from zoo.training.config import TrainConfig, build_parser
from zoo.training.optimizer import OptimConfig
from zoo.training.step import init_state, make_trainer, mesh_context

from run_utils import snapshot
from step_utils import assert_same_step, packed_batch, shard_shapes, single_and_sharded_step

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
needs_8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 fake CPU devices (tests/conftest.py)")


def _packed_batch(cfg, b=8, t=32, seed=0):
    return packed_batch(cfg.vocab_size, b, t, seed)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small JSONL corpus of word salad and a sentencepiece tokenizer trained on it."""
    d = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    words = np.array("the of a model train step shard mesh token loss data grad param jax flax scan".split())
    with open(d / "docs.jsonl", "w") as f:
        for _ in range(200):
            f.write(json.dumps({"text": " ".join(rng.choice(words, rng.integers(5, 60)))}) + "\n")
    data.train_tokenizer(data.DocumentSource([str(d)]), d / "tok.model", vocab_size=300)
    return d


@needs_8
def test_sharded_step_matches_single_device():
    cfg = zoo.config("tiny-llama", dtype="float32", param_dtype="float32")
    single, sharded, start = single_and_sharded_step(cfg, _packed_batch(cfg), "data=2,fsdp=2,tensor=2", grad_accum=2)
    # the parameters really are split: per-device shard shapes, not just specs
    gate = start["params"]["layers"]["mlp"]["gate_proj"]["kernel"]  # [L, D, F]: embed->fsdp, mlp->tensor
    assert gate.shape == (2, 64, 128) and len(gate.addressable_shards) == 8
    assert shard_shapes(gate) == {(2, 32, 64)}
    emb = start["params"]["embed_tokens"]["embedding"]  # [V, D]: vocab->tensor, embed->fsdp
    assert shard_shapes(emb) == {(cfg.vocab_size // 2, 32)}
    mu = start["opt_state"][1][0].mu["layers"]["mlp"]["gate_proj"]["kernel"]  # optimizer state too
    assert shard_shapes(mu) == {(2, 32, 64)}
    assert_same_step(single, sharded)


def test_grad_accumulation_equals_full_batch():
    cfg = zoo.config("tiny-llama", dtype="float32")
    mesh = make_mesh("data=1", devices=jax.devices()[:1])
    opt = OptimConfig(lr=1e-3, warmup_steps=0, decay_steps=10, eps=1e-3)
    batch = _packed_batch(cfg, b=4, t=16)
    batch["segment_ids"][0, 10:] = 0  # rows with different target counts: the mean is per token
    out = []
    for accum in (1, 4):
        tr = make_trainer(cfg, mesh, opt, batch_size=4, seq_len=16, grad_accum=accum)
        state, metrics = tr.step(init_state(tr, mesh, 0), batch)
        out.append((jax.device_get(state["params"]), jax.device_get(metrics)))
    np.testing.assert_allclose(out[1][1]["loss"], out[0][1]["loss"], rtol=1e-6)
    np.testing.assert_allclose(out[1][1]["grad_norm"], out[0][1]["grad_norm"], rtol=1e-5)
    assert out[0][1]["targets"] == out[1][1]["targets"] == np.sum(
        (batch["segment_ids"][:, 1:] == batch["segment_ids"][:, :-1]) & (batch["segment_ids"][:, :-1] > 0))


def test_packed_documents_get_no_gradient_from_each_other():
    cfg = zoo.config("tiny-llama", dtype="float32")  # untied head: embedding rows get gradient only as inputs
    model = zoo.build(cfg)
    t, split = 24, 14
    seg = np.array([[1] * split + [2] * (t - split)], np.int32)
    ids = np.concatenate([np.arange(10, 10 + split), np.arange(100, 100 + t - split)])[None].astype(np.int32)
    pos = data.restart_positions(seg)
    params = nn.unbox(model.init(jax.random.PRNGKey(0), jnp.asarray(ids))["params"])

    def doc_b_output(p, segment_ids, positions):
        logits = model.apply({"params": p}, ids, positions=positions, segment_ids=segment_ids)
        return jnp.sum(jnp.sin(logits[0, split:]))  # any function of document B's outputs

    grad_fn = jax.jit(jax.grad(doc_b_output))
    grad = grad_fn(params, seg, pos)["embed_tokens"]["embedding"]
    assert np.all(np.asarray(grad[10:10 + split]) == 0.0)  # document A's input embeddings: exactly zero
    assert np.all(np.abs(np.asarray(grad[100:100 + t - split])).sum(-1) > 0)  # document B's own: non-zero
    leaky = grad_fn(params, np.ones_like(seg), np.arange(t)[None])["embed_tokens"]["embedding"]
    assert np.abs(np.asarray(leaky[10:10 + split])).sum() > 0  # without segment ids A does reach B

    # and the packed row's loss is the sum of each document's own loss
    @jax.jit
    def loss(b):
        return objectives.causal_lm_loss(model, params, b, None)

    packed, _ = loss({"input_ids": ids, "segment_ids": seg, "positions": pos})
    alone = sum(loss({"input_ids": ids[:, s], "segment_ids": np.ones_like(ids[:, s]),
                      "positions": np.arange(s.stop - s.start)[None]})[0] for s in (slice(0, split), slice(split, t)))
    np.testing.assert_allclose(packed, alone, rtol=1e-5)


def _run(argv):
    result = train.main(argv + ["--no-progress"])
    assert isinstance(result, dict), result
    return result


def test_resume_matches_uninterrupted_run_bitwise(tmp_path, corpus, capsys):
    common = ["--model", "tiny-llama", "--data", str(corpus), "--tokenizer", str(corpus / "tok.model"),
              "--batch-size", "8", "--seq-len", "32", "--decay-steps", "6", "--warmup-steps", "2",
              "--checkpoint-every", "2", "--sample-tokens", "0"]
    _run(common + ["--steps", "3", "--out", str(tmp_path / "a")])  # "preempted" after 3 steps
    # A resume that would change the schedule is refused, naming the flag and both values, and touches nothing.
    before = snapshot(tmp_path / "a")
    assert train.main(common + ["--steps", "6", "--lr", "0.01", "--out", str(tmp_path / "a")]) == 2
    assert "--lr 0.01 differs from 0.005" in capsys.readouterr().err
    assert snapshot(tmp_path / "a") == before
    resumed = _run(common + ["--steps", "6", "--out", str(tmp_path / "a")])  # --decay-steps fixed: may grow
    straight = _run(common + ["--steps", "6", "--out", str(tmp_path / "b")])
    assert resumed["start_step"] == 3 and len(resumed["losses"]) == 3

    def records(d):
        return [json.loads(line) for line in open(tmp_path / d / "metrics.jsonl")]

    a, b = records("a"), records("b")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a, b):  # losses bitwise (data order included), and the optimizer's view
        assert (ra["loss"], ra["grad_norm"], ra["learning_rate"]) == (rb["loss"], rb["grad_norm"],
                                                                       rb["learning_rate"])
    assert straight["losses"][3:] == resumed["losses"]


@pytest.mark.main_leg
def test_train_script_small_mode_end_to_end(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    result = _run(["--model", "tiny-gpt2", "--data", str(corpus / "docs.jsonl"), "--steps", "4",
                   "--batch-size", "16", "--seq-len", "32", "--checkpoint-every", "2", "--sample-tokens", "8",
                   "--sample-prompt", "the model", "--grad-accum", "2", "--remat", "dots", "--dtype", "bfloat16",
                   "--attention-impl", "xla", "--z-loss", "1e-4", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "trained a" in printed and (out / "tokenizer.model").is_file()  # no --tokenizer: trained and saved
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        for field in ("step", "loss", "learning_rate", "grad_norm", "tokens_per_second", "mfu"):
            assert np.isfinite(r[field]), field
        assert r["tokens_per_second"] > 0 and 0 < r["mfu"] < 1 and r["z_loss"] > 0 and r["tokens"] > 0
    assert sorted(os.listdir(out / "checkpoints")) == ["2", "4"]
    fields = json.load(open(out / "zoo_config.json"))["fields"]  # the model flags reached the model config
    assert (fields["remat"], fields["dtype"], fields["attention_impl"]) == ("dots", "bfloat16", "xla")
    assert (out / "loss.png").stat().st_size > 1000
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(out / "tb"))
    assert result["sample"].startswith("the model") and "---- sample" in printed
    again = _run(["--model", "tiny-gpt2", "--data", str(corpus / "docs.jsonl"), "--steps", "4", "--batch-size",
                  "8", "--seq-len", "32", "--sample-tokens", "0", "--out", str(out)])
    assert again["losses"] == [] and "nothing to train" in capsys.readouterr().out


def test_help_documents_every_flag():
    text = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--help"], capture_output=True,
                          text=True, check=True, cwd=ROOT).stdout
    actions = [a for a in build_parser()._actions if a.option_strings and a.dest != "help"]
    assert len(actions) > 25
    flat = "".join(text.split())  # argparse wraps help lines (also at hyphens)
    for action in actions:
        assert action.help and len(action.help) > 10, action.option_strings  # explained, not just listed
        assert "".join(action.help.split()) in flat, action.option_strings
    assert "default: small-llama" in text and "default: 8" in text  # defaults are shown


@pytest.mark.parametrize("argv, message", [
    (["--mesh", "data=3"], "data=3"),
    (["--mesh", "tensor=8", "--model", "tiny-llama"], "does not divide num_heads"),
    (["--model", "no-such-model"], "unknown model"),
    (["--model", "tiny-bert", "--objective", "clm"], "--objective clm trains"),
    (["--data", "/no/such/path"], "does not exist"),
    (["--steps", "0"], "--steps"),
    (["--batch-size", "ten"], "--batch-size"),
    (["--lr", "-1"], "--lr"),
    (["--batch-size", "12", "--grad-accum", "5"], "does not divide --batch-size"),
    (["--seq-len", "100000", "--model", "tiny-llama"], "max_seq_len"),
])
def test_bad_flags_fail_before_compiling(argv, message, capsys, monkeypatch, tmp_path):
    def no_compile(*a, **k):
        raise AssertionError("compiled despite a bad flag")

    for module in (pretrain, finetune, plan):
        monkeypatch.setattr(module, "make_trainer", no_compile)
    monkeypatch.setattr(data, "train_tokenizer", no_compile)
    assert train.main(argv + ["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train.py: error:") and message in err[0], err


def test_tokenizer_larger_than_model_vocab_fails_before_compiling(corpus, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(pretrain, "make_trainer", lambda *a, **k: pytest.fail("compiled"))
    argv = ["--model", "tiny-llama", "--data", str(corpus), "--tokenizer", str(corpus / "tok.model"),
            "--out", str(tmp_path)]
    n = data.Tokenizer(corpus / "tok.model").vocab_size
    assert train.main(argv + ["--vocab-size", "128"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"has {n} tokens but model 'tiny-llama' has vocab_size=128" in err[0], err
    cfg = pretrain.resolve_inputs(TrainConfig.from_args(argv + ["--vocab-size", "tokenizer"]))[0]
    assert cfg.vocab_size == -(-n // 128) * 128


def test_model_from_hf_config_json(tmp_path):
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 256, "hidden_size": 32,
              "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "rope_theta": 10000.0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    args = TrainConfig.from_args(["--model", str(tmp_path), "--data", "synthetic", "--seq-len", "32",
                                  "--out", str(tmp_path / "run")])
    cfg = pretrain.resolve_inputs(args)[0]
    assert (cfg.family, cfg.vocab_size, cfg.hidden_size, cfg.num_kv_heads) == ("llama", 256, 32, 2)


def test_bad_flag_exit_code_in_a_fresh_process():
    t0 = time.time()
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--model", "nope"], capture_output=True,
                          text=True, cwd=ROOT)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("train.py")]
    assert len(lines) == 1 and "unknown model 'nope'" in lines[0] and "Traceback" not in proc.stderr
    assert time.time() - t0 < 60


@pytest.mark.main_leg
def test_embedded_default_run(tmp_path):
    """`python train.py` as a user runs it: <= 5 minutes, loss falls >= 2 nats, a sample."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as a user has
    t0 = time.time()
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--out", str(tmp_path / "default"),
                           "--no-progress"], capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
    wall = time.time() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in open(tmp_path / "default" / "metrics.jsonl")]
    assert records[0]["loss"] - records[-1]["loss"] >= 2.0
    assert (tmp_path / "default" / "loss.png").is_file() and os.listdir(tmp_path / "default" / "checkpoints")
    assert "---- sample" in proc.stdout
    assert wall <= 300, wall


def _one_step(cfg, batch, seed=0):
    """(metrics, params) after one train step on one device from a seeded init."""
    mesh = make_mesh("data=1", devices=jax.devices()[:1])
    # eps above float32 noise: Adam's first update is ~sign(g) for tiny gradients.
    tr = make_trainer(cfg, mesh, OptimConfig(lr=1e-2, warmup_steps=0, decay_steps=10, eps=1e-3),
                      batch_size=batch["input_ids"].shape[0], seq_len=batch["input_ids"].shape[1])
    with mesh_context(mesh):
        state = init_state(tr, mesh, seed=seed)
        before = jax.device_get(state)
        state, metrics = tr.step(state, batch)
    return before, jax.device_get(state), jax.device_get(metrics), tr


def test_bf16_compute_keeps_float32_master_weights_and_optimizer_state():
    cfg = zoo.config("tiny-llama", dtype="bfloat16", param_dtype="float32")
    before, after, metrics, tr = _one_step(cfg, _packed_batch(cfg, b=4, t=16))
    for tree in (before["params"], after["params"], after["opt_state"]):
        dtypes = {x.dtype for x in jax.tree.leaves(tree) if np.issubdtype(x.dtype, np.floating)}
        assert dtypes == {np.dtype("float32")}, dtypes
    # Logits leave the model in float32 (for the loss) but were computed in bfloat16:
    # every value is a bfloat16 number, which float32 compute would not give.
    ids = jnp.arange(8, dtype=jnp.int32)[None]
    logits = np.asarray(tr.model.apply({"params": after["params"]}, ids), np.float32)
    np.testing.assert_array_equal(logits, logits.astype(jnp.bfloat16).astype(np.float32))
    f32_logits = np.asarray(zoo.build(cfg.replace(dtype="float32")).apply({"params": after["params"]}, ids))
    assert not np.array_equal(f32_logits, f32_logits.astype(jnp.bfloat16).astype(np.float32))
    assert np.isfinite(metrics["loss"])


def test_remat_policies_change_memory_not_numbers():
    cfg = zoo.config("tiny-llama", dtype="float32", param_dtype="float32")
    batch = _packed_batch(cfg, b=4, t=16)
    results = {r: _one_step(cfg.replace(remat=r), batch)[1:3] for r in ("none", "full", "dots")}
    (p0, m0) = results["none"]
    for policy in ("full", "dots"):
        p, m = results[policy]
        np.testing.assert_allclose(m["loss"], m0["loss"], rtol=1e-6)
        np.testing.assert_allclose(m["grad_norm"], m0["grad_norm"], rtol=1e-5)
        for a, b in zip(jax.tree.leaves(p["params"]), jax.tree.leaves(p0["params"])):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_cross_entropy_and_z_loss_match_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (2, 5, 11)).astype(np.float32)
    targets = rng.integers(0, 11, (2, 5)).astype(np.int32)
    valid = rng.random((2, 5)) > 0.3
    c = 1e-3
    total, aux = objectives.cross_entropy_sums(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(valid), c)
    x = logits.astype(np.float64)
    lse = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
    nll = np.sum((lse - np.take_along_axis(x, targets[..., None], -1)[..., 0]) * valid)
    z = np.sum(lse**2 * valid)
    np.testing.assert_allclose(aux["nll"], nll, rtol=1e-6)
    np.testing.assert_allclose(aux["z_loss"], z, rtol=1e-6)
    np.testing.assert_allclose(total, nll + c * z, rtol=1e-6)
    assert aux["weight"] == valid.sum()


def test_flops_per_token_is_the_documented_formula():
    # 6 * (matmul params incl. the lm head) + 12 * layers * d_attn * keys (PaLM appendix B), with
    # keys = seq / 2 for causal attention (MaxText's and FlashAttention's convention), written out
    # by hand for GPT-2 124M: 12 D^2 per layer (qkv+out 4 D^2, MLP 8 D^2).
    L, D, V, T = 12, 768, 50257, 1024
    assert zoo.config("gpt2-124m").flops_per_token(T) == 6 * (L * 12 * D * D + V * D) + 12 * L * D * (T / 2)
    # Llama-3.1-8B: GQA projections (q, o: D x D; k, v: D x 1024) and a 3-matrix MLP.
    L, D, F, KV, V = 32, 4096, 14336, 1024, 128256
    dense = L * (2 * D * D + 2 * D * KV + 3 * D * F) + V * D
    assert zoo.config("llama3.1-8b").flops_per_token(T) == 6 * dense + 12 * L * D * (T / 2)
    # The causal half is exactly the attention term of a non-causal count halved.
    llama = zoo.config("llama3.1-8b")
    assert llama.flops_per_token(2 * T) - llama.flops_per_token(T) == 12 * L * D * (T / 2)
    # Mistral's 4096-key window at 32k: a query sees min(position, W) keys, mean W - W^2 / (2T).
    mistral, T = zoo.config("mistral-7b"), 32768
    W = mistral.sliding_window
    mean_keys = np.minimum(np.arange(1, T + 1), W).mean()  # exact count, to compare the closed form
    assert mistral.attended_keys(T) == pytest.approx(mean_keys, rel=1e-3)
    assert mistral.attended_keys(W) == W / 2
    # BERT attends both ways: every key.
    assert zoo.config("bert-base").attended_keys(512) == 512


def test_progress_bar_shows_loss_and_throughput(tmp_path, capsys):
    result = train.main(["--model", "tiny-llama", "--data", "synthetic", "--steps", "3", "--batch-size", "8",
                         "--seq-len", "16", "--sample-tokens", "0", "--out", str(tmp_path / "run")])
    assert isinstance(result, dict)
    err = capsys.readouterr().err
    assert "3/3" in err and "loss=" in err and "tok_s=" in err
