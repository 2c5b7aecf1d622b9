"""Attention kernels: one entry point, `attention`, dispatching by lowering platform.

  api.py         `attention`: validates once, picks the implementation
  base.py        what every implementation shares: validation, options, block sizes,
                 block ranges, mask predicate
  sharding.py    shard_map wrapping over the mesh in context
  reference.py   `reference_attention`, pure jnp: the specification and the oracle
  tpu.py         the Mosaic TPU flash kernel (also run in interpret mode on CPU)
  gpu_triton.py  the Triton GPU flash kernel

kernels/ imports nothing from zoo.
"""

from kernels.api import IMPLEMENTATIONS, attention
from kernels.reference import reference_attention

__all__ = ["IMPLEMENTATIONS", "attention", "reference_attention"]
