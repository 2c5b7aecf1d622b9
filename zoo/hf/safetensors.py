"""safetensors files, one tensor at a time: reading a (possibly sharded) checkpoint and writing one file.

Reads go by the header's offsets (numpy has no bfloat16, and plain reads keep only the
tensor being converted in host memory); writes stream tensor by tensor after a header
computed up front from shapes and dtypes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import ml_dtypes
import numpy as np

from zoo.hf.rules import CheckpointError

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2, "I64": np.int64,
          "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_NAMES = {np.dtype(v): k for k, v in DTYPES.items()}


class SafetensorsFile:
    """One .safetensors file: keys, shapes, and tensors read one at a time.

    safe_open validates the header and that the data covers it (a truncated file fails
    here); numpy has no bfloat16, so each tensor is read by the header's offsets, which
    serves every dtype the same way. Plain reads rather than a memory map: only the
    tensor being converted occupies host memory beside the destination buffers.
    """

    def __init__(self, path: Path):
        from safetensors import SafetensorError, safe_open

        self.path = path
        try:
            with safe_open(str(path), framework="numpy") as f:
                self.keys = list(f.keys())
        except (SafetensorError, OSError) as e:
            cut = _first_cut_tensor(path)
            where = f" (tensor {cut!r} extends past the end of the file)" if cut else ""
            raise CheckpointError(f"{path}: cannot read safetensors file (truncated or corrupt?){where}: {e}") from e
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            self.header = json.loads(fh.read(n))
        self.data_start = 8 + n

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.header[key]["shape"])

    def read(self, key: str) -> np.ndarray:
        info = self.header[key]
        if info["dtype"] not in DTYPES:
            raise CheckpointError(f"{self.path}: tensor {key!r} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        raw = np.fromfile(self.path, dtype=np.uint8, count=end - begin, offset=self.data_start + begin)
        return raw.view(DTYPES[info["dtype"]]).reshape(info["shape"])


def _first_cut_tensor(path: Path) -> str | None:
    """The first tensor whose data lies past the end of a truncated file; None when the
    header itself does not parse (safetensors' own message then says what is wrong)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if n > size:
                return None
            header = json.loads(fh.read(n))
        ends = sorted((info["data_offsets"][1], key) for key, info in header.items() if key != "__metadata__")
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError):
        return None
    return next((key for end, key in ends if 8 + n + end > size), None)


def checkpoint_files(root: Path) -> list[Path]:
    """The safetensors files of an HF checkpoint dir: model.safetensors, or every shard of its index."""
    single, index = root / "model.safetensors", root / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a safetensors index (needs a `weight_map`): {e}") from e
        files = [root / name for name in dict.fromkeys(weight_map.values())]
        for file in files:
            if not file.exists():
                raise CheckpointError(f"{index}: shard {file.name} is missing")
        return files
    if single.exists():
        return [single]
    raise CheckpointError(f"{root}: no model.safetensors or model.safetensors.index.json")


def write_safetensors(path: Path, tensors: list[tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]]):
    """Writes a safetensors file tensor by tensor: (key, shape, dtype, produce) entries.

    The header is known up front from shapes and dtypes, so only one tensor is in
    host memory at a time; numpy's missing bfloat16 is no obstacle either.
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, shape, dtype, _ in tensors:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[key] = {"dtype": _NAMES[np.dtype(dtype)], "shape": list(shape),
                       "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format pads the header to 8-byte alignment
    with open(path, "wb") as fh:
        fh.write(len(blob).to_bytes(8, "little"))
        fh.write(blob)
        for key, shape, dtype, produce in tensors:
            x = produce()
            if x.shape != tuple(shape) or x.dtype != np.dtype(dtype):
                raise CheckpointError(f"{path}: internal: tensor {key!r} is {x.shape} {x.dtype}, "
                                      f"expected {tuple(shape)} {np.dtype(dtype)}")
            fh.write(np.ascontiguousarray(x).tobytes())
        fh.flush()
        os.fsync(fh.fileno())
