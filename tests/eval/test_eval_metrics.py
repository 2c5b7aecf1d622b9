"""zoo.eval.metrics against independent computations: hand-worked examples, sacrebleu and
rouge-score called directly."""

from __future__ import annotations

import numpy as np
import pytest
import sacrebleu
from rouge_score import rouge_scorer

from zoo import eval as zeval


def test_accuracy_and_f1_hand_worked():
    labels = [0, 0, 1, 1, 1, 2]
    preds = [0, 1, 1, 1, 0, 2]
    # class 0: tp 1 fp 1 fn 1 -> F1 1/2; class 1: tp 2 fp 1 fn 1 -> 2/3; class 2: tp 1 -> 1
    assert zeval.accuracy(preds, labels) == pytest.approx(4 / 6)
    assert zeval.f1_score(preds, labels) == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert zeval.f1_score(preds, labels, average="binary", positive=1) == pytest.approx(2 / 3)
    assert zeval.f1_score([1, 1, 1], [0, 0, 0], average="binary") == 0.0  # no true positive: 0, not NaN
    with pytest.raises(zeval.EvalError):
        zeval.accuracy([1, 2], [1])


def test_bleu_hand_worked_and_against_sacrebleu():
    # Hypothesis one word longer than the reference (brevity penalty 1); n-gram precisions
    # 6/7, 5/6, 4/5, 3/4, so BLEU = (6/7 * 5/6 * 4/5 * 3/4) ** (1/4) = (3/7) ** (1/4).
    assert zeval.bleu(["the cat sat on the mat today"], ["the cat sat on the mat"]) == pytest.approx(
        100 * (3 / 7) ** 0.25, abs=1e-6)
    assert zeval.bleu(["a b c d e"], ["a b c d e"]) == pytest.approx(100.0)
    hyps = ["the dog ran under the red rug", "a big cat sat", "then the small dog sat on a mat"]
    refs = ["the dog ran under the blue rug", "the big cat sat down", "then a small dog sat on the mat"]
    assert zeval.bleu(hyps, refs) == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)


def test_rouge_hand_worked_and_against_rouge_score():
    # hypothesis unigrams all in the 6-word reference: P 1, R 1/2; bigrams: P 1, R 2/5; LCS 3.
    r = zeval.rouge(["the cat sat"], ["the cat sat on the mat"])
    assert r["rouge1"] == pytest.approx(100 * 2 / 3)
    assert r["rouge2"] == pytest.approx(100 * 2 * 0.4 / 1.4)
    assert r["rougeL"] == pytest.approx(100 * 2 / 3)
    hyps = ["the dogs ran under the red rug", "a big cat sat"]
    refs = ["the dog runs under the blue rug", "the big cats sat down"]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    ref_scores = [scorer.score(t, h) for h, t in zip(hyps, refs)]
    got = zeval.rouge(hyps, refs)
    for key in ("rouge1", "rouge2", "rougeL"):
        assert got[key] == pytest.approx(100 * np.mean([s[key].fmeasure for s in ref_scores]))
