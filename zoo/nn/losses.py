"""Token-level cross-entropy pieces shared by the objectives (zoo/objectives.py) and models that
compute a loss inside themselves (DeepSeek's multi-token prediction), without importing the
objectives (which import the registry, which imports the models)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from zoo.nn.chunked_ce import VocabStats, vocab_stats
from zoo.nn.vocab_head import VocabHead


def shift_left(x_BT, n: int = 1):
    """x moved n positions left along T, zeros past the end."""
    t = x_BT.shape[1]
    return jnp.pad(x_BT[:, n:], ((0, 0), (0, min(n, t))))[:, :t]


def next_token_targets(input_ids_BT, segment_ids_BT, ahead: int = 1):
    """Targets `ahead` tokens on (1: the next token) and their mask: only within one document,
    never from padding.

    A position has no target when the row ends within `ahead` tokens or a document ends before
    the target (every position up to it must be in the position's document).
    """
    valid_BT = segment_ids_BT > 0
    for m in range(1, ahead + 1):
        valid_BT &= shift_left(segment_ids_BT, m) == segment_ids_BT
    return shift_left(input_ids_BT, ahead), valid_BT


def cross_entropy_sums(logits_BTV, targets_BT, valid_BT, z_loss: float = 0.0):
    """Summed cross-entropy (+ z_loss * logsumexp^2, PaLM's auxiliary loss) over valid targets."""
    logits_BTV = logits_BTV.astype(jnp.promote_types(logits_BTV.dtype, jnp.float32))
    lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    return _sums(VocabStats(lse_BT, target_logit_BT, jnp.argmax(logits_BTV, axis=-1)), targets_BT, valid_BT, z_loss)


def vocab_cross_entropy_sums(h_BTD, head: VocabHead, targets_BT, valid_BT, z_loss: float = 0.0, *,
                             vocab_block: int):
    """cross_entropy_sums of head.logits(h_BTD), computed over blocks of `vocab_block` vocabulary
    columns without the [B, T, V] logits (zoo/nn/chunked_ce.py); 0: on the logits."""
    if not vocab_block:
        return cross_entropy_sums(head.logits(h_BTD), targets_BT, valid_BT, z_loss)
    return _sums(vocab_stats(h_BTD, head, targets_BT, vocab_block=vocab_block), targets_BT, valid_BT, z_loss)


def _sums(stats: VocabStats, targets_BT, valid_BT, z_loss):
    weight_BT = valid_BT.astype(jnp.float32)
    nll = jnp.sum((stats.lse - stats.target_logit) * weight_BT)
    z = jnp.sum(jnp.square(stats.lse) * weight_BT)
    correct = jnp.sum((stats.argmax == targets_BT) * weight_BT)
    total = nll + z_loss * z if z_loss else nll
    return total, {"weight": jnp.sum(weight_BT), "nll": nll, "z_loss": z, "accuracy": correct}
