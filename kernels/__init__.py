"""Attention kernels: one entry point, `attention`, dispatching by lowering platform.

  api.py         `attention`: validates once, picks the implementation
  base.py        what every implementation shares: validation, options, block sizes,
                 block ranges, mask predicate
  sharding.py    shard_map wrapping over the mesh in context
  reference.py   `reference_attention`, pure jnp: the specification and the oracle
  tpu.py         the Mosaic TPU flash kernel (also run in interpret mode on CPU)
  gpu_mosaic.py  the Mosaic GPU flash kernel for Hopper+ (sm90): entry point and custom_vjp;
                 gpu_mosaic_fwd.py / gpu_mosaic_bwd.py hold its forward and backward kernels
  gpu_triton.py  the Triton GPU flash kernel (implementation="pallas_triton", pre-Hopper)

kernels/ imports nothing from zoo.
"""

from kernels.api import IMPLEMENTATIONS, attention
from kernels.reference import reference_attention

__all__ = ["IMPLEMENTATIONS", "attention", "reference_attention"]
