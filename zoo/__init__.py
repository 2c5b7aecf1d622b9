"""The model zoo: registry of presets, model construction, Hugging Face import/export.

    >>> import zoo
    >>> cfg = zoo.config("tiny-llama")
    >>> model = zoo.build(cfg)
    >>> params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import linen  # not `as nn`: zoo.nn is the subpackage of building blocks

from zoo import registry
from zoo.configs import ModelConfig
from zoo.hf.convert import from_hf, to_hf
from zoo.inference import generate
from zoo.models.gpt2.config import GPT2Config
from zoo.models.llama.config import LlamaConfig
from zoo.presets import PRESETS


def list_models() -> list[str]:
    """Names of every preset, sorted."""
    return sorted(PRESETS)


def config(name: str, **overrides) -> ModelConfig:
    """The preset called `name`, with any fields overridden (e.g. dtype="float32")."""
    if name not in PRESETS:
        import difflib

        close = difflib.get_close_matches(name, PRESETS, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}.{hint} Known: {', '.join(list_models())}")
    cfg = PRESETS[name]
    return cfg.replace(**overrides) if overrides else cfg


def build(cfg: ModelConfig) -> linen.Module:
    """The flax.linen Module for a config (params are created by `init`, never held)."""
    return registry.of(cfg).build(cfg)


def abstract_params(cfg: ModelConfig, seq_len: int = 8):
    """Parameter ShapeDtypeStructs (boxed with logical axes) via jax.eval_shape: no memory used."""
    model = build(cfg)
    ids = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
    return jax.eval_shape(lambda i: model.init(jax.random.key(0), i), ids)["params"]


def param_count(cfg: ModelConfig) -> int:
    """Number of parameters of a config, computed abstractly."""
    leaves = jax.tree.leaves(linen.unbox(abstract_params(cfg)))
    return sum(math.prod(x.shape) for x in leaves)


def active_param_count(cfg: ModelConfig) -> int:
    """Parameters one token's forward uses: `param_count` less what a config says a token skips
    (`inactive_param_count`: a mixture's unchosen routed experts and the input embedding table,
    a lookup; DeepSeek's "37B activated" convention). Configs without it: param_count."""
    return param_count(cfg) - getattr(cfg, "inactive_param_count", 0)


__all__ = ["list_models", "config", "build", "abstract_params", "param_count", "active_param_count", "from_hf",
           "to_hf", "generate", "ModelConfig", "GPT2Config", "LlamaConfig", "PRESETS"]
