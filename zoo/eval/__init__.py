"""Evaluation: metrics (zoo.eval.metrics) and eval tasks that run a model (zoo.eval.tasks).

    from zoo import eval as zeval
    zeval.perplexity(model, params, docs, seq_len=256)
    zeval.text_metrics(hypotheses, references)

Loading a model dir is zoo.pretrained; `EvalError` (defined there, with loading) is the
one user error of both, re-exported here.
"""

from zoo.eval.metrics import (
                              ROUGE_TYPES,
                              accuracy,
                              bleu,
                              classification_metrics,
                              cross_entropy,
                              f1_score,
                              rouge,
                              text_metrics,
)
from zoo.eval.tasks import class_logits, generate_texts, perplexity, windows
from zoo.pretrained import EvalError

__all__ = ["EvalError", "ROUGE_TYPES", "accuracy", "bleu", "classification_metrics", "cross_entropy", "f1_score",
           "rouge", "text_metrics", "class_logits", "generate_texts", "perplexity", "windows"]
