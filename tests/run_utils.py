"""Helpers for tests of commands that must refuse bad input without touching anything."""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


def snapshot(directory) -> dict[str, bytes]:
    """Every file under `directory` (relative path -> bytes): compare before and after a refusal."""
    return {os.path.relpath(os.path.join(d, f), directory): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(directory) for f in files}


def saved_params(out, step: int):
    """The params of a run's checkpoint, onto one device whatever mesh or processes wrote it."""
    path = os.path.join(os.path.abspath(out), "checkpoints", str(step), "state")
    checkpointer = ocp.StandardCheckpointer()
    meta = checkpointer.metadata(path)
    meta = getattr(meta, "item_metadata", meta)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          getattr(meta, "tree", meta))
    return jax.device_get(checkpointer.restore(path, target)["params"])
