"""The one loop, from both sides: fine-tuning gained SIGTERM checkpoint-and-resume (bitwise), and
pretraining gained a held-out evaluation (--eval-data / --eval-every) checked against an
independent numpy computation of the same loss."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import zoo
from zoo import data
from zoo.training.main import main

from run_utils import saved_params

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "great", "bad", "awful", "the", "a", "movie", "plot",
         "was", "is", "very", "quite", "film"]


def _env() -> dict:
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
                XLA_FLAGS="--xla_force_host_platform_device_count=8")


@pytest.fixture(scope="module")
def classify_inputs(tmp_path_factory):
    """A word-level tokenizer and 48 {"text", "label"} lines (label 1 iff a positive word occurs)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    root = tmp_path_factory.mktemp("classify")
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(root / "tokenizer.json"))
    rng = np.random.default_rng(0)
    with open(root / "train.jsonl", "w") as f:
        for _ in range(48):
            label = int(rng.random() < 0.5)
            words = list(rng.choice(WORDS[9:], 5)) + [str(rng.choice(["good", "great"] if label else ["bad", "awful"]))]
            f.write(json.dumps({"text": " ".join(words), "label": label}) + "\n")
    return root


EPOCHS = 3  # x 6 steps of 8 rows


def _finetune_argv(root, out):
    return ["--task", "classify", "--model", "tiny-bert-cls", "--tokenizer", str(root / "tokenizer.json"),
            "--data", str(root / "train.jsonl"), "--epochs", str(EPOCHS), "--batch-size", "8", "--lr", "1e-3",
            "--checkpoint-every", "1", "--keep-checkpoints", "2", "--no-progress", "--out", str(out)]


def test_finetune_sigterm_checkpoints_exits_0_and_resumes_bitwise(classify_inputs, tmp_path):
    reference = tmp_path / "reference"
    summary = main(_finetune_argv(classify_inputs, reference))
    assert isinstance(summary, dict) and summary["steps"] == EPOCHS * 6
    expected = saved_params(reference, EPOCHS * 6)

    out = tmp_path / "run"
    argv = [sys.executable, "train.py", *_finetune_argv(classify_inputs, out)]
    proc = subprocess.Popen(argv, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and sum(1 for _ in open(metrics)) >= 3:
            break
        time.sleep(0.002)
    proc.send_signal(signal.SIGTERM)
    log = proc.communicate(timeout=240)[0]
    assert proc.returncode == 0, log[-3000:]
    assert "SIGTERM: checkpoint saved at step" in log and "Traceback" not in log
    stopped = int(log.split("SIGTERM: checkpoint saved at step ")[1].split(";")[0])
    assert 3 <= stopped < EPOCHS * 6

    again = subprocess.run(argv, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert f"from its checkpoint at step {stopped}" in again.stdout
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(expected),
                            jax.tree.leaves(saved_params(out, EPOCHS * 6))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))
    steps = [json.loads(line)["step"] for line in open(metrics)]
    assert steps == list(range(1, EPOCHS * 6 + 1))  # each step logged once, across the stop
    epochs = [r for r in map(json.loads, open(metrics)) if "train_loss" in r]
    assert [r["epoch"] for r in epochs] == [1, 2, 3] and [r["step"] for r in epochs] == [6, 12, 18]


def _nll_reference(cfg, params, tokenizer, docs, seq_len):
    """Mean next-token NLL of the held-out docs packed into rows (eos after each, no target across
    documents or rows), with a float64 numpy log-softmax over the model's logits."""
    ids, seg = [], []
    for k, text in enumerate(docs):
        toks = list(tokenizer.encode(text)) + [tokenizer.eos_id]
        ids += toks
        seg += [k + 1] * len(toks)
    rows = math.ceil(len(ids) / seq_len)
    ids = np.pad(np.asarray(ids), (0, rows * seq_len - len(ids))).reshape(rows, seq_len)
    seg = np.pad(np.asarray(seg), (0, rows * seq_len - len(seg))).reshape(rows, seq_len)
    model = zoo.build(cfg)
    nll = count = 0.0
    for r in range(rows):
        pos = data.restart_positions(seg[r:r + 1])
        logits = np.asarray(model.apply({"params": params}, ids[r:r + 1], segment_ids=seg[r:r + 1],
                                        positions=pos), np.float64)[0]
        logp = logits - logits.max(-1, keepdims=True)
        logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
        for t in range(seq_len - 1):
            if seg[r, t] > 0 and seg[r, t + 1] == seg[r, t]:
                nll -= logp[t, ids[r, t + 1]]
                count += 1
    return nll / count, count


def test_pretraining_eval_data_logs_eval_loss_and_perplexity(tmp_path):
    rng = np.random.default_rng(0)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    (tmp_path / "train.txt").write_text("\n".join(" ".join(rng.choice(words, 12)) for _ in range(300)) + "\n")
    dev = [" ".join(rng.choice(words, 12)) for _ in range(10)]
    (tmp_path / "dev.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in dev))
    out = tmp_path / "run"
    summary = main(["--model", "tiny-llama", "--data", str(tmp_path / "train.txt"), "--eval-data",
                    str(tmp_path / "dev.jsonl"), "--eval-every", "2", "--steps", "4", "--seq-len", "32",
                    "--batch-size", "8", "--sample-tokens", "0", "--no-progress", "--out", str(out),
                    "--dtype", "float32"])
    assert isinstance(summary, dict)
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        assert r["eval_perplexity"] == pytest.approx(math.exp(r["eval_loss"]))
    assert evals[1]["eval_loss"] < evals[0]["eval_loss"]  # it learns the 12-word language
    cfg = zoo.config("tiny-llama", dtype="float32")
    loss, count = _nll_reference(cfg, saved_params(out, 4), data.Tokenizer(out / "tokenizer.model"), dev, 32)
    assert evals[1]["eval_tokens"] == count
    assert evals[1]["eval_loss"] == pytest.approx(loss, rel=1e-4)
    assert (out / "loss.png").stat().st_size > 0
    events = b"".join(p.read_bytes() for p in (out / "tb").iterdir())
    assert b"eval/loss" in events and b"eval/perplexity" in events
