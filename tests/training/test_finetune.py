"""Fine-tuning through train.py's shared step: `--task classify` (BERT) and `--task seq2seq` (T5)
in small mode, the seq2seq objective against transformers, and bad input (one line, exit 2).

Tests that need torch + transformers carry the `torch` mark (imported inside them).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import train
import zoo
from zoo import eval as ev

POSITIVE = ("good", "great", "excellent")
FILLER = tuple("the a movie film plot actor scene story was is it and of to this that with very quite".split())
COLOURS = ("red", "green", "blue", "black", "white", "pink")
FARBEN = ("rot", "gruen", "blau", "schwarz", "weiss", "rosa")


def _word_tokenizer(path, tokens):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token=tokens[1]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))


def _sentiment(path, n, seed):
    """{"text", "label"} lines: label 1 iff the text holds one of POSITIVE among filler words."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(n):
            words = list(rng.choice(FILLER, rng.integers(4, 11)))
            label = int(rng.random() < 0.5)
            if label:
                words.insert(int(rng.integers(0, len(words) + 1)), str(rng.choice(POSITIVE)))
            f.write(json.dumps({"text": " ".join(words), "label": label}) + "\n")
    return path


BERT_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *POSITIVE, *FILLER]


@pytest.mark.torch
def test_classify_tiny_bert_reaches_95_percent_and_plots_accuracy(tmp_path, capsys):
    """Acceptance: a tiny random BertForSequenceClassification learns the generated set to >= 95% eval accuracy."""
    import torch
    import transformers

    from zoo.__main__ import main as cli

    init = tmp_path / "bert"
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64, num_labels=2)
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(config).save_pretrained(init)
    _word_tokenizer(init / "tokenizer.json", BERT_TOKENS)
    out = tmp_path / "run"
    result = train.main(["--task", "classify", "--init", str(init), "--data", str(_sentiment(tmp_path / "train.jsonl",
                         512, 0)), "--eval-data", str(_sentiment(tmp_path / "dev.jsonl", 128, 1)), "--epochs", "4",
                         "--batch-size", "32", "--lr", "2e-3", "--warmup-steps", "5", "--out", str(out),
                         "--no-progress"])
    printed = capsys.readouterr().out
    assert isinstance(result, dict), result
    epochs = result["epochs"]
    assert [e["epoch"] for e in epochs] == [1, 2, 3, 4]
    assert epochs[-1]["eval_accuracy"] >= 0.95, epochs
    assert "loaded 25 tensors; fresh: none" in printed and "epoch 4/4:" in printed
    assert (out / "accuracy.png").stat().st_size > 0 and (out / "loss.png").is_file()

    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in records] == list(range(1, 4 * 16 + 1))
    assert all({"loss", "learning_rate", "tokens_per_second"} <= set(r) for r in records)
    per_epoch = [r for r in records if "eval_accuracy" in r]
    assert [r["eval_accuracy"] for r in per_epoch] == [e["eval_accuracy"] for e in epochs]
    assert all("eval_f1" in r for r in per_epoch)

    # The run dir is a model dir: `python -m zoo eval` scores the same eval set identically.
    assert cli(["eval", "--model", str(out), "--data", str(tmp_path / "dev.jsonl"), "--json", "--no-progress"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["accuracy"] == epochs[-1]["eval_accuracy"]
    assert metrics["f1"] == pytest.approx(epochs[-1]["eval_f1"])


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    """A tiny random T5 written by zoo.to_hf (no torch needed) with a word-level tokenizer."""
    from zoo.models.t5.config import T5Config

    path = tmp_path_factory.mktemp("t5")
    cfg = T5Config(name="tiny", vocab_size=16, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                   relative_attention_num_buckets=8, relative_attention_max_distance=16, dtype="float32")
    model = zoo.build(cfg)
    params = jax.jit(lambda k: nn.unbox(model.init(k, jnp.ones((1, 4), jnp.int32))["params"]))(jax.random.key(0))
    zoo.to_hf(model, params, path)
    _word_tokenizer(path / "tokenizer.json", ["<pad>", "</s>", "<unk>", *COLOURS, *FARBEN])
    return path


def _translation(path, n, seed):
    """{"input", "target"} lines: colour words and their German names, word for word."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(n):
            idx = rng.integers(0, len(COLOURS), rng.integers(2, 6))
            f.write(json.dumps({"input": " ".join(COLOURS[i] for i in idx),
                                "target": " ".join(FARBEN[i] for i in idx)}) + "\n")
    return path


def test_seq2seq_tiny_t5_loss_falls_and_reports_bleu_rouge(t5_dir, tmp_path, capsys):
    import sacrebleu

    init = t5_dir
    out = tmp_path / "run"
    result = train.main(["--task", "seq2seq", "--init", str(init), "--data", str(_translation(
                         tmp_path / "train.jsonl", 256, 0)), "--eval-data", str(_translation(tmp_path / "dev.jsonl",
                         32, 1)), "--epochs", "3", "--batch-size", "16", "--lr", "3e-3", "--warmup-steps", "5",
                         "--out", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert isinstance(result, dict), result
    losses, epochs = result["losses"], result["epochs"]
    assert len(losses) == 3 * 16 and np.isfinite(losses).all()
    assert np.mean(losses[-8:]) < np.mean(losses[:8]) - 0.3, losses
    assert epochs[-1]["eval_loss"] < epochs[0]["eval_loss"]
    for e in epochs:
        assert {"eval_bleu", "eval_rouge1", "eval_rouge2", "eval_rougeL"} <= set(e)
    assert "bleu" in printed and "rougeL" in printed and (out / "scores.png").is_file()

    # The reported scores are those of the saved predictions, recomputed with sacrebleu directly.
    preds = [json.loads(line) for line in open(out / "eval_predictions.jsonl")]
    assert len(preds) == 32
    hyps, refs = [p["prediction"] for p in preds], [p["target"] for p in preds]
    assert epochs[-1]["eval_bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert epochs[-1]["eval_rougeL"] == pytest.approx(ev.rouge(hyps, refs)["rougeL"])
    last = [json.loads(line) for line in open(out / "metrics.jsonl")][-1]
    assert last["eval_bleu"] == epochs[-1]["eval_bleu"] and last["step"] == 48


@pytest.mark.torch
def test_seq2seq_objective_equals_transformers_t5_loss(t5_dir):
    """The "seq2seq" objective on padded rows = T5ForConditionalGeneration(labels=...) per pair, token-weighted."""
    import torch
    import transformers

    from zoo.objectives import get
    from zoo.training.finetune import _seq2seq_batch

    init = t5_dir
    model, params = zoo.from_hf(init)
    enc, tgt = [[3, 4, 5, 1], [6, 7, 1], [8, 1]], [[11, 12, 13, 1], [14, 9, 1], [10, 11, 12, 13, 1]]
    batch = _seq2seq_batch(enc, tgt, np.arange(3), 4, 6, model.cfg.decoder_start_token_id)  # one empty row
    _, sums = jax.jit(lambda p, b: get("seq2seq").loss_fn(model, p, b, None))(params, batch)
    hf = transformers.T5ForConditionalGeneration.from_pretrained(init).eval()
    nll = 0.0
    for e, t in zip(enc, tgt):
        with torch.no_grad():
            nll += hf(input_ids=torch.tensor([e]), labels=torch.tensor([t])).loss.item() * len(t)
    assert float(sums["weight"]) == sum(map(len, tgt))
    assert float(sums["nll"]) == pytest.approx(nll, rel=1e-5)


@pytest.fixture(scope="module")
def bert_cls_dir(tmp_path_factory):
    """A tiny random 2-class BERT classifier (zoo.to_hf, no torch) with a word-level tokenizer."""
    path = tmp_path_factory.mktemp("bert")
    cfg = zoo.config("tiny-bert-cls").replace(num_labels=2, vocab_size=64)
    model = zoo.build(cfg)
    params = jax.jit(lambda k: nn.unbox(model.init(k, jnp.ones((1, 4), jnp.int32))["params"]))(jax.random.key(0))
    zoo.to_hf(model, params, path)
    _word_tokenizer(path / "tokenizer.json", BERT_TOKENS)
    return path


@pytest.mark.parametrize("lines, extra, message", [
    ([{"text": "good movie"}], [], "missing field 'label'"),
    ([{"text": "good movie", "label": 2}], [], "label 2 is out of range for 2 classes"),
    ([{"text": "good movie", "label": "pos"}], [], "label must be an integer"),
    ([], [], "no records (empty file)"),
    ([{"text": "good", "label": 1}], ["--model", "tiny-llama"], None),
    ([{"text": "good", "label": 1}], ["--task", "seq2seq"], "missing field 'input'"),
])
def test_bad_finetune_input_is_one_line_exit_2(lines, extra, message, bert_cls_dir, tmp_path, capsys, no_compile):
    init = bert_cls_dir
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in lines))
    argv = ["--task", "classify", "--data", str(data), "--out", str(tmp_path / "run")]
    if extra[:1] == ["--model"]:  # a decoder from scratch: no classification head
        tok = bert_cls_dir / "tokenizer.json"
        argv += extra + ["--tokenizer", str(tok)]
        message = "has no classification head"
    else:
        argv += ["--init", str(init)] + extra
    assert train.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train.py: error:") and message in err[0], err


def test_classify_needs_data_flag(tmp_path, capsys):
    assert train.main(["--task", "classify", "--init", str(tmp_path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs --data FILE.jsonl with fields text, label" in err[0]


def test_masked_lm_checkpoint_gets_a_fresh_classifier_head():
    """--init from BertForMaskedLM: encoder tensors carried over, pooler + classifier fresh, MLM head dropped."""
    from zoo.training.finetune import merge_params

    def filled(cfg, value):  # shapes from jax.eval_shape; the values tell the two sources apart
        return jax.tree.map(lambda a: jnp.full(a.shape, value, a.dtype), nn.unbox(zoo.abstract_params(cfg)))

    mlm = filled(zoo.config("tiny-bert"), 2.0)
    fresh = filled(zoo.config("tiny-bert-cls").replace(num_labels=3), 1.0)
    params, kept, new, dropped = merge_params(fresh, mlm)
    assert sorted(new) == ["classifier/bias", "classifier/kernel", "pooler/bias", "pooler/kernel"]
    assert dropped == ["mlm_bias", "mlm_dense/bias", "mlm_dense/kernel", "mlm_norm/bias", "mlm_norm/scale"]
    np.testing.assert_array_equal(params["word_embeddings"]["embedding"], mlm["word_embeddings"]["embedding"])
    np.testing.assert_array_equal(params["classifier"]["kernel"], fresh["classifier"]["kernel"])
    assert len(kept) + len(new) == len(jax.tree.leaves(fresh))
