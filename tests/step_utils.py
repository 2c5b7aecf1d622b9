"""The shared body of the "sharded step equals the single-device step" tests."""

from __future__ import annotations

import jax
import numpy as np

from zoo import data, objectives
from zoo.sharding import make_mesh
from zoo.training.optimizer import OptimConfig
from zoo.training.step import init_state, make_trainer, mesh_context

# eps well above float32 rounding of the gradients: Adam's first step is ~sign(g), which
# would otherwise turn reduction-order noise on near-zero gradients into O(lr) changes.
OPT = OptimConfig(lr=1e-3, warmup_steps=0, decay_steps=10, eps=1e-3)


def packed_batch(vocab_size: int, b: int = 8, t: int = 32, seed: int = 0, docs=(18, 11)) -> dict:
    """A batch of rows packing documents of `docs` tokens (18 and 11), then padding."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((b, t), np.int32)
    for i, end in enumerate(np.cumsum(docs)):
        seg[:, end - docs[i]:end] = i + 1
    ids = np.where(seg > 0, rng.integers(4, vocab_size, (b, t)), 0).astype(np.int32)
    return {"input_ids": ids, "segment_ids": seg, "positions": data.restart_positions(seg)}


def single_and_sharded_step(cfg, batch, spec: str, *, objective: str = "clm", grad_accum: int = 1, opt=OPT):
    """One train step from the same initial state on 1 device and on mesh `spec` over 8.

    Returns (params_1, metrics_1), (params_8, metrics_8) on the host, and the sharded
    state the 8-device step started from (for asserting how it is split).
    """
    b, t = batch["input_ids"].shape
    results, sharded_start = [], None
    for mesh_spec, devices in (("data=1", jax.devices()[:1]), (spec, jax.devices()[:8])):
        mesh = make_mesh(mesh_spec, devices=devices)
        tr = make_trainer(cfg, mesh, opt, objective=objective, batch_size=b, seq_len=t, grad_accum=grad_accum)
        if not results:
            state = init_state(tr, mesh, seed=0)
            host_state = jax.device_get(state)
        else:
            state = jax.device_put(host_state, tr.state_shardings)
            sharded_start = jax.device_put(host_state, tr.state_shardings)  # `state` is donated
        gbatch = {k: jax.device_put(batch[k], tr.batch_sharding) for k in objectives.get(objective).fields}
        with mesh_context(mesh):
            state, metrics = tr.step(state, gbatch)
        results.append((jax.device_get(state["params"]), jax.device_get(metrics)))
    return results[0], results[1], sharded_start


def steps_on_meshes(cfg, batches, specs, *, seq_len: int, batch_size: int = 8, opt=OPT):
    """[((loss, grad_norm) per step, host params)] after len(batches) clm steps from the same seed on
    each mesh spec (a "data=1" spec runs on one device, others on the first 8)."""
    fields = objectives.get("clm").fields
    runs = []
    for spec in specs:
        devices = jax.devices()[:1] if spec == "data=1" else jax.devices()[:8]
        mesh = make_mesh(spec, devices=devices)
        tr = make_trainer(cfg, mesh, opt, batch_size=batch_size, seq_len=seq_len)
        state, losses = init_state(tr, mesh, seed=0), []
        for batch in batches:
            with mesh_context(mesh):
                state, metrics = tr.step(state, {k: jax.device_put(batch[k], tr.batch_sharding) for k in fields})
            losses.append((float(metrics["loss"]), float(metrics["grad_norm"])))
        runs.append((losses, jax.device_get(state["params"])))
    return runs


def assert_same_steps(one, other, rtol=1e-5):
    """Two `steps_on_meshes` runs: losses and gradient norms to `rtol`, every parameter after the
    last step to `rtol` in relative norm."""
    (losses_1, p_1), (losses_2, p_2) = one, other
    np.testing.assert_allclose(losses_2, losses_1, rtol=rtol)
    assert len(set(losses_1)) == len(losses_1)  # different steps
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(p_1), jax.tree.leaves(p_2)):
        rel = np.linalg.norm(a - b) / max(float(np.linalg.norm(a)), 1e-6)
        assert rel <= rtol, (jax.tree_util.keystr(path), rel)


def shard_shapes(x) -> set[tuple[int, ...]]:
    """The shapes of an array's per-device pieces."""
    return {s.data.shape for s in x.addressable_shards}


def assert_same_step(single, sharded, *, keys=("loss", "grad_norm"), rtol=1e-5):
    """Metrics agree to `rtol`, and every updated parameter to `rtol` in relative norm."""
    (p1, m1), (p8, m8) = single, sharded
    for key in keys:
        np.testing.assert_allclose(m8[key], m1[key], rtol=rtol, err_msg=key)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(p1), jax.tree.leaves(p8)):
        name = jax.tree_util.keystr(path)
        if name.endswith("['k_proj']['bias']") and np.linalg.norm(a) <= 1e-6:
            # a key bias gets an exactly-zero gradient (softmax ignores a constant shift of a query's
            # logits): it moves only by reduction-order noise, so its bound is absolute, not relative.
            # (With attention sinks the shift is not constant, the bias learns, and the relative bound holds.)
            assert np.linalg.norm(a - b) <= 1e-8, (name, np.linalg.norm(a - b))
            continue
        rel = np.linalg.norm(a - b) / max(float(np.linalg.norm(a)), 1e-6)
        assert rel <= rtol, (name, rel)
