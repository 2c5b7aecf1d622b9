"""A check every decoder family's KV cache shares, without PyTorch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

import zoo


def assert_cached_greedy_equals_forward(cfg, new_tokens: int = 12) -> None:
    """Greedy tokens from zoo.generate's KV cache, on a left-padded batch, equal the argmax of the
    full forward over the prompt and the tokens so far (mask and pad-aware positions)."""
    model = zoo.build(cfg)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, cfg.vocab_size, (3, 9)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[0, :4], mask[1, :2] = 0, 0
    ids[mask == 0] = 0
    params = model.init(jax.random.PRNGKey(1), jnp.asarray(ids))["params"]
    params = jax.tree.map(lambda p: p * 4.0 if p.ndim > 1 else p, nn.unbox(params))  # decisive argmaxes
    new = np.asarray(zoo.generate(model, params, ids, mask, max_new_tokens=new_tokens))
    full_ids = np.concatenate([ids, new], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(new)], axis=1)
    positions = np.maximum(np.cumsum(full_mask, -1) - 1, 0)
    logits = model.apply({"params": params}, jnp.asarray(full_ids), jnp.asarray(full_mask),
                         positions=jnp.asarray(positions))
    np.testing.assert_array_equal(np.asarray(jnp.argmax(logits, -1))[:, ids.shape[1] - 1:-1], new)
