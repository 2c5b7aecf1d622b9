"""The one jitted train step: `(state, batch) -> (state, metrics)` for every model and objective.

It is jitted once with in/out shardings derived from the parameters' logical axis names
(zoo/sharding.py) and donates the state; the state is initialised through
`jax.eval_shape` and a jit with out_shardings, so the full model never exists
unsharded. Gradient accumulation is a `lax.scan` over microbatches inside the step.
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec

import zoo
from zoo import objectives, registry
from zoo.sharding import RULES, constrain, logical_spec, logical_to_sharding
from zoo.training.optimizer import OptimConfig, make_optimizer


def batch_shards(mesh) -> int:
    """How many ways the batch dimension is split over `mesh`: read from the "batch" sharding rule."""
    axes = logical_spec("batch")[0]
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return math.prod(mesh.shape[a] for a in axes)


@contextlib.contextmanager
def mesh_context(mesh):
    """The mesh and the logical-axis rules, so activation constraints inside models apply."""


    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        yield


class Trainer(NamedTuple):
    """Everything the loop needs: the jitted init and step, and the shardings they use."""

    model: object
    init: object  # rng -> state (sharded)
    step: object  # (state, batch) -> (state, metrics), donating state
    abstract_state: object  # ShapeDtypeStructs with shardings
    state_shardings: object
    batch_sharding: object
    schedule: object
    batch_fields: tuple  # the objective's batch fields, in order


def make_train_step(model, objective, tx, schedule, *, grad_accum: int = 1, z_loss: float = 0.0):
    """The pure step `(state, batch) -> (state, metrics)` shared by every model and objective.

    The batch is split into `grad_accum` microbatches (rows strided, so each one still
    spans every batch shard) and a `lax.scan` adds up their gradients and loss sums;
    the total is divided once by the number of targets, so the result is the
    token-weighted mean over the whole batch whatever the split.
    """


    after_step = registry.of(model.cfg).after_step

    def loss_sums(params, batch, rng):
        return objective.loss_fn(model, params, batch, rng, z_loss=z_loss)

    grad_fn = jax.value_and_grad(loss_sums, has_aux=True)

    def train_step(state, batch):
        params = state["params"]
        rng, step_rng = jax.random.split(state["rng"])

        def split(x_BT):
            x_ABT = x_BT.reshape(x_BT.shape[0] // grad_accum, grad_accum, *x_BT.shape[1:]).swapaxes(0, 1)
            return constrain(x_ABT, (None, "batch", "length"))

        micro = {k: split(batch[k]) for k in objective.fields}

        def accumulate(carry, xs):
            grads, sums = carry
            mb, i = xs
            (total, aux), g = grad_fn(params, mb, jax.random.fold_in(step_rng, i))
            grads = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads, g)
            sums = {k: sums[k] + v for k, v in {"loss": total, **aux}.items()}
            return (grads, sums), None

        first = jax.tree.map(lambda x: x[0], micro)
        sums_shape = jax.eval_shape(lambda: {"loss": jnp.zeros(()), **loss_sums(params, first, step_rng)[1]})
        zeros = (jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params),
                 jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), sums_shape))
        (grads, sums), _ = jax.lax.scan(accumulate, zeros, (micro, jnp.arange(grad_accum)))

        weight = jnp.maximum(sums.pop("weight"), 1.0)
        load = sums.pop(objectives.ROUTER_LOAD, None)
        grads = jax.tree.map(lambda g: g / weight, grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        metrics = {k: v / weight for k, v in sums.items()}
        if load is not None:  # a non-gradient update from the whole batch's expert loads (DeepSeek-V3's balancing)
            new_params = after_step(model.cfg, new_params, load)
            metrics["router_max_load"] = jnp.mean(jnp.max(load, -1) / jnp.maximum(jnp.mean(load, -1), 1.0))
        grad_norm = optax.global_norm(grads)
        # A non-finite loss or gradient leaves params and optimizer state as they were
        # (the step counter and rng still advance, so data and schedule stay aligned).
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        keep_if_bad = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        new_params = keep_if_bad(new_params, params)
        opt_state = keep_if_bad(opt_state, state["opt_state"])
        metrics.update(grad_norm=grad_norm, learning_rate=schedule(state["step"]),
                       tokens=jnp.sum(batch["segment_ids"] > 0).astype(jnp.float32), targets=weight,
                       nonfinite=1.0 - finite.astype(jnp.float32))
        new_state = {"step": state["step"] + 1, "params": new_params, "opt_state": opt_state, "rng": rng}
        return new_state, metrics

    return train_step


def make_trainer(cfg, mesh, opt: OptimConfig, *, objective: str = "clm", batch_size: int, seq_len: int,
                 grad_accum: int = 1, z_loss: float = 0.0) -> Trainer:
    """Builds the model, optimizer, shardings, and the jitted init and step for `mesh`."""


    model = zoo.build(cfg)
    obj = objectives.get(objective)
    tx, schedule = make_optimizer(opt)

    # The init forward runs under the mesh (kernels shard_map over it), so its batch
    # must split over the batch axes; it is traced abstractly or compiled sharded.
    init_rows = batch_shards(mesh)

    def boxed_init(rng):
        params = model.init(rng, jnp.zeros((init_rows, seq_len), jnp.int32))["params"]
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params), "rng": rng}

    rng_shape = jax.ShapeDtypeStruct((2,), jnp.uint32)
    with mesh_context(mesh):
        abstract_boxed = jax.eval_shape(boxed_init, rng_shape)
    state_shardings = logical_to_sharding(nn.get_partition_spec(abstract_boxed), mesh)
    abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                  nn.unbox(abstract_boxed), state_shardings)
    init = jax.jit(lambda rng: nn.unbox(boxed_init(rng)), out_shardings=state_shardings)

    batch_sharding = NamedSharding(mesh, logical_spec("batch", "length"))
    step_fn = make_train_step(model, obj, tx, schedule, grad_accum=grad_accum, z_loss=z_loss)
    jitted = jax.jit(step_fn, in_shardings=(state_shardings, {k: batch_sharding for k in obj.fields}),
                     out_shardings=(state_shardings, NamedSharding(mesh, PartitionSpec())), donate_argnums=0)
    abstract_batch = {k: jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32, sharding=batch_sharding)
                      for k in obj.fields}
    with mesh_context(mesh):
        compiled = jitted.lower(abstract_state, abstract_batch).compile()
    return Trainer(model, init, compiled, abstract_state, state_shardings, batch_sharding, schedule, obj.fields)


def init_state(trainer: Trainer, mesh, seed: int):
    """A fresh sharded state: params straight into their shards (never built whole)."""

    with mesh_context(mesh):
        return trainer.init(jax.random.PRNGKey(seed))


def make_eval_step(trainer: Trainer, objective: str):
    """Jitted `(params, batch, rng) -> (nll sum, target count)` of an objective on held-out rows
    (no update; compiled once per batch shape)."""
    loss_fn = objectives.get(objective).loss_fn
    model = trainer.model

    def sums(params, batch, rng):
        _, s = loss_fn(model, params, batch, rng)
        return s["nll"], s["weight"]

    return jax.jit(sums)
