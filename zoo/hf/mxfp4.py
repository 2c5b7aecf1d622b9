"""MXFP4 (OCP microscaling FP4) weights as GPT-OSS checkpoints ship their experts.

A tensor W [..., R, C] (R output rows, C inputs) is stored as
  `<name>_blocks` uint8 [..., R, C/32, 16]: 32 E2M1 codes per block, two per byte (low nibble
      first: element 2j is byte j & 0xF, element 2j+1 is byte j >> 4);
  `<name>_scales` uint8 [..., R, C/32]: one E8M0 exponent per block (bias 127).
E2M1 codes (sign in bit 3) are the values below; a block's values are multiplied by
2 ** (scale - 127). HF's GPT-OSS parameter is the transpose of the last two axes, [..., C, R]
(input-major), which is what `dequantize` returns.
"""

from __future__ import annotations

import numpy as np

# The 16 E2M1 values by code: 0 .. 7 positive, 8 .. 15 their negatives.
E2M1_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                        -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)


def dequantize(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """float32 [..., C, R] from MXFP4 blocks [..., R, C/32, 16] and scales [..., R, C/32]."""
    blocks, scales = np.asarray(blocks), np.asarray(scales)
    if blocks.dtype != np.uint8 or scales.dtype != np.uint8:
        raise ValueError(f"MXFP4 blocks and scales are uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.shape[-1] != 16 or blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 blocks {blocks.shape} and scales {scales.shape} do not pair "
                         "(blocks must be scales' shape + (16,))")
    values = np.empty(blocks.shape[:-1] + (32,), np.float32)
    values[..., 0::2] = E2M1_VALUES[blocks & 0x0F]
    values[..., 1::2] = E2M1_VALUES[blocks >> 4]
    values *= np.exp2(scales.astype(np.float32) - 127.0)[..., None]
    rows = values.reshape(*values.shape[:-2], -1)  # [..., R, C]
    return np.ascontiguousarray(np.swapaxes(rows, -1, -2))


def dequantized_shape(blocks_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape `dequantize` returns for blocks of this shape, without reading them (a shape that
    is not [..., R, G, 16] comes back as it is, for the caller's shape check to name)."""
    if len(blocks_shape) < 3 or blocks_shape[-1] != 16:
        return tuple(blocks_shape)
    *lead, rows, groups, _ = blocks_shape
    return (*lead, groups * 32, rows)

