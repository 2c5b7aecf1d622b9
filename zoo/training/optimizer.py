"""AdamW with linear warmup, cosine decay and global-norm clipping (optax)."""

from __future__ import annotations

import dataclasses

import jax
import optax


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """The optimizer's hyper-parameters (TrainConfig.optim() builds one from the flags)."""

    lr: float = 5e-3
    warmup_steps: int = 10
    decay_steps: int = 200
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0


def _decay_mask(params):
    """No weight decay on norm scales, biases and router correction biases (which no gradient trains)."""
    def keep(path, _):
        names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        return names[-1] not in ("scale", "bias", "correction_bias")
    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(opt: OptimConfig):
    """(optax transformation, learning-rate schedule)."""
    warmup = min(opt.warmup_steps, max(opt.decay_steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=opt.lr, warmup_steps=warmup, decay_steps=max(opt.decay_steps, warmup + 1),
        end_value=opt.lr * opt.min_lr_ratio)
    parts = [optax.clip_by_global_norm(opt.clip_norm)] if opt.clip_norm > 0 else []
    parts.append(optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay,
                             mask=_decay_mask))
    return optax.chain(*parts), schedule
