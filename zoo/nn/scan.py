"""The layer scan: one block scanned over a leading `layers` axis, rematerialised per policy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

# zoo.configs.REMAT_POLICIES names the choices; this maps each (but "none") to jax's checkpoint policy.
CHECKPOINT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "save_attention_out": jax.checkpoint_policies.save_only_these_names("attention_out"),
}


def scan_layers(block_cls: type[nn.Module], num_layers: int, remat: str, name: str = "layers",
                per_layer_index: bool = False, **block_kwargs):
    """The block scanned over a leading `layers` param axis, rematerialised per policy.

    Compile time stays flat in depth. The block's call signature is
    (carry, *broadcast_args) -> (carry, per-layer output); with `per_layer_index` the block
    also gets its layer index as a last argument (for layers of different kinds).
    """
    block = block_cls
    if remat != "none":
        block = nn.remat(block, policy=CHECKPOINT_POLICIES[remat], prevent_cse=False)
    scanned = nn.scan(
        block,
        variable_axes={"params": 0, "cache": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast, nn.broadcast, 0) if per_layer_index else nn.broadcast,
        length=num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
    layers = scanned(name=name, **block_kwargs)
    if not per_layer_index:
        return layers
    return lambda x, *args: layers(x, *args, jnp.arange(num_layers, dtype=jnp.int32))
