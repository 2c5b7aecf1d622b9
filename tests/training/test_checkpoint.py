"""zoo.checkpoint: sharded save/restore with the data-iterator state, keep-last-K,
and resuming past an interrupted save."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from zoo.checkpoint import Checkpointer, abstract_with_shardings
from zoo.sharding import make_mesh


def _state(mesh, value):
    sharded = NamedSharding(mesh, PartitionSpec("fsdp"))
    replicated = NamedSharding(mesh, PartitionSpec())
    n = mesh.shape["fsdp"] * 4
    state = {"params": {"w": jnp.arange(n * 3, dtype=jnp.float32).reshape(n, 3) + value},
             "step": jnp.asarray(value, jnp.int32), "rng": jax.random.PRNGKey(value)}
    shardings = {"params": {"w": sharded}, "step": replicated, "rng": replicated}
    return jax.device_put(state, shardings), shardings


def test_save_restore_keeps_values_shardings_and_data_state(tmp_path):
    mesh = make_mesh("fsdp=-1")
    state, shardings = _state(mesh, 7)
    ckpt = Checkpointer(tmp_path / "checkpoints", keep=2)
    ckpt.save(7, state, {"parent_state": {"next_index": 5}, "remainder": [1, 2]})
    ckpt.wait()
    abstract = abstract_with_shardings(jax.eval_shape(lambda: state), shardings)
    restored, data_state = ckpt.restore(ckpt.latest_step(), abstract)
    ckpt.close()
    assert data_state == {"parent_state": {"next_index": 5}, "remainder": [1, 2]}
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert a.sharding == b.sharding
    w = restored["params"]["w"]
    assert {s.data.shape for s in w.addressable_shards} == {(w.shape[0] // mesh.shape["fsdp"], 3)}


def test_keeps_last_k_and_skips_unfinished_saves(tmp_path):
    mesh = make_mesh("fsdp=-1")
    ckpt = Checkpointer(tmp_path / "checkpoints", keep=2)
    for step in (1, 2, 3):
        ckpt.save(step, _state(mesh, step)[0], {"step": step})
    ckpt.close()
    assert sorted(int(p) for p in os.listdir(tmp_path / "checkpoints") if p.isdigit()) == [2, 3]
    # a save killed mid-write leaves only orbax's temporary directory behind
    os.makedirs(tmp_path / "checkpoints" / "4.orbax-checkpoint-tmp-123")
    again = Checkpointer(tmp_path / "checkpoints", keep=2)
    assert again.latest_step() == 3 and again.all_steps() == [2, 3]
    again.close()

