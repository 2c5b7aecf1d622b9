"""Dense layers whose parameters carry logical axis names, and the default initializer."""

from __future__ import annotations

from typing import Any, Callable

import jax.numpy as jnp
from flax import linen as nn

default_init = nn.initializers.normal(stddev=0.02)


def param_with_axes(init: Callable, names: tuple[str | None, ...]) -> Callable:
    """An initializer whose parameter carries logical axis names."""
    return nn.with_logical_partitioning(init, names)


class Dense(nn.Module):
    """DenseGeneral over the last `len(in_axes)` dims with logical axis names.

    The kernel has shape in_shape + out_shape, axes in_axes + out_axes.
    """

    features: tuple[int, ...]
    in_axes: tuple[str | None, ...]
    out_axes: tuple[str | None, ...]
    use_bias: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Callable = default_init

    @nn.compact
    def __call__(self, x):
        n_in = len(self.in_axes)
        in_shape = x.shape[-n_in:]
        kernel = self.param(
            "kernel", param_with_axes(self.kernel_init, self.in_axes + self.out_axes),
            in_shape + tuple(self.features), self.param_dtype,
        )
        x = x.astype(self.dtype)
        kernel = kernel.astype(self.dtype)
        letters = "abcdefgh"
        lhs = "Z" + letters[:n_in]
        rhs = letters[:n_in] + "uvwxy"[: len(self.features)]
        out = "Z" + "uvwxy"[: len(self.features)]
        batch_shape = x.shape[:-n_in]
        y = jnp.einsum(f"{lhs},{rhs}->{out}", x.reshape((-1,) + in_shape), kernel)
        y = y.reshape(batch_shape + tuple(self.features))
        if self.use_bias:
            bias = self.param("bias", param_with_axes(nn.initializers.zeros, self.out_axes),
                              tuple(self.features), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y
