"""Metrics, each checked against an independent computation in the tests.

  * accuracy and F1 (macro over the classes seen in labels or predictions);
  * cross-entropy of class logits;
  * BLEU: sacrebleu's corpus BLEU (13a tokenisation, 0-100);
  * ROUGE-1/2/L: rouge-score's F-measure (Porter stemmer), averaged over examples, 0-100.

Perplexity is an eval task (zoo.eval.tasks.perplexity): it runs the model.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import sacrebleu
from rouge_score import rouge_scorer

from zoo.pretrained import EvalError


def cross_entropy(logits_NC: np.ndarray, labels_N: np.ndarray) -> float:
    """Mean cross-entropy (nats) of class logits against integer labels."""
    z = logits_NC - logits_NC.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(labels_N)), labels_N].mean())


def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Fraction of predictions equal to the labels."""
    p, y = np.asarray(predictions), np.asarray(labels)
    if p.shape != y.shape or not p.size:
        raise EvalError(f"accuracy needs equally many predictions and labels (>0), got {p.size} and {y.size}")
    return float(np.mean(p == y))


def f1_score(predictions: Sequence[int], labels: Sequence[int], *, average: str = "macro",
             positive: int = 1) -> float:
    """F1 = 2PR/(P+R). average="macro": the mean over every class present in labels or
    predictions (a class with no true or predicted member would be undefined, so it is
    not counted); "binary": the F1 of class `positive`. A class with P+R = 0 scores 0.
    """
    p, y = np.asarray(predictions), np.asarray(labels)
    if p.shape != y.shape or not p.size:
        raise EvalError(f"f1 needs equally many predictions and labels (>0), got {p.size} and {y.size}")

    def f1(c):
        tp = np.sum((p == c) & (y == c))
        fp, fn = np.sum((p == c) & (y != c)), np.sum((p != c) & (y == c))
        return 0.0 if tp == 0 else 2.0 * tp / (2.0 * tp + fp + fn)

    if average == "binary":
        return float(f1(positive))
    if average != "macro":
        raise ValueError(f"average must be 'macro' or 'binary', got {average!r}")
    classes = np.union1d(p, y)
    return float(np.mean([f1(c) for c in classes]))


def classification_metrics(predictions: Sequence[int], labels: Sequence[int]) -> dict:
    """dict(accuracy, f1) with macro F1 (0-1)."""
    return {"accuracy": accuracy(predictions, labels), "f1": f1_score(predictions, labels)}


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """sacrebleu corpus BLEU (0-100) of hypotheses against one reference each."""
    if len(hypotheses) != len(references) or not hypotheses:
        raise EvalError(f"BLEU needs equally many hypotheses and references (>0), got {len(hypotheses)} "
                        f"and {len(references)}")
    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)


ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def rouge(hypotheses: Sequence[str], references: Sequence[str], types: Sequence[str] = ROUGE_TYPES) -> dict:
    """rouge-score F-measures (Porter stemmer), averaged over examples, scaled to 0-100."""
    if len(hypotheses) != len(references) or not hypotheses:
        raise EvalError(f"ROUGE needs equally many hypotheses and references (>0), got {len(hypotheses)} "
                        f"and {len(references)}")
    scorer = rouge_scorer.RougeScorer(list(types), use_stemmer=True)
    scores = [scorer.score(ref, hyp) for hyp, ref in zip(hypotheses, references)]
    return {t: 100.0 * float(np.mean([s[t].fmeasure for s in scores])) for t in types}


def text_metrics(hypotheses: Sequence[str], references: Sequence[str]) -> dict:
    """dict(bleu, rouge1, rouge2, rougeL), all 0-100."""
    return {"bleu": bleu(hypotheses, references), **rouge(hypotheses, references)}
