"""Checkpoints: a thin wrapper over orbax's CheckpointManager.

One checkpoint per saved step under `<out>/checkpoints/<step>/` with two items:
"state" (params, optimizer state, step, rng: sharded arrays, written by every host
for its shards) and "data" (the data iterator's state, JSON). Saves are
asynchronous: `save` returns once the arrays are copied off the devices, so the
next (donating) train step may run while files are written. A save that never
finished leaves only a temporary directory, which `latest_step` ignores, so a
restarted run resumes from the latest complete checkpoint.
"""

from __future__ import annotations

import contextlib
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from zoo import multihost


@contextlib.contextmanager
def quiet_absl():
    """Silences absl warnings for a block: orbax warns "Metadata file does not exist" when
    it reads one item of a checkpoint (the step-level metadata lives a level up), on every
    resume and load, though nothing is wrong."""
    from absl import logging as absl_logging

    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        yield
    finally:
        absl_logging.set_verbosity(verbosity)


class CheckpointMismatch(ValueError):
    """A checkpoint that cannot resume this run (another model, another process count)."""


def _flat(tree) -> dict[str, tuple[tuple[int, ...], str]]:
    """{"a/b/kernel": (shape, dtype name)} for every array leaf of a nested dict."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): (tuple(x.shape), str(np.dtype(x.dtype)))
            for path, x in leaves}


class Checkpointer:
    """Async save every N steps, keep the last K, restore sharded state + data-iterator state."""

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3):
        self.directory = os.path.abspath(directory)
        # With several processes, orbax's barriers (some run on its async-save thread) go through
        # the coordination service by naming every process as active; its default barrier is a
        # device collective, which the main thread's collectives could interleave with.
        multi = jax.process_count() > 1
        if multi:  # orbax refuses create=True with active_processes set
            if jax.process_index() == 0:
                os.makedirs(self.directory, exist_ok=True)
            multihost.barrier("checkpoint-dir")
        processes = ocp.options.MultiprocessingOptions(active_processes=set(range(jax.process_count())) if multi
                                                       else None)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not multi, enable_async_checkpointing=True,
                                               multiprocessing_options=processes)
        self.manager = ocp.CheckpointManager(self.directory, item_names=("state", "data"), options=options)

    def latest_step(self) -> int | None:
        """The step of the newest complete checkpoint, or None."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of every complete checkpoint kept, ascending."""
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, data_state: dict | None) -> None:
        """Starts an async save of `state` (a pytree of jax.Arrays) and the iterator state.

        Every process must call it. Each process's data-iterator state differs (its
        own slice of the data), so they are gathered and stored together, one per process.
        """
        gathered = multihost.allgather_json("checkpoint-data", data_state or {})
        per_process = {"process_count": jax.process_count(), "processes": gathered}
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(per_process))
        self.manager.save(step, args=args, force=True)

    def check_compatible(self, step: int, abstract_state) -> None:
        """Raises CheckpointMismatch (naming the first differing parameter) unless checkpoint
        `step` holds parameters of exactly `abstract_state`'s names, shapes and dtypes, written
        by as many processes as this run has.

        Reads only metadata, so a run pointed at another model's directory stops before
        compiling or loading anything.
        """
        data = self.manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"] or {}
        if data.get("process_count", jax.process_count()) != jax.process_count():
            raise CheckpointMismatch(
                f"checkpoint {self.directory}/{step} was written by {data['process_count']} processes and its data "
                f"order cannot be split over {jax.process_count()}; resume with {data['process_count']} processes")
        with quiet_absl():
            meta = ocp.StandardCheckpointer().metadata(os.path.join(self.directory, str(step), "state"))
        meta = getattr(meta, "item_metadata", meta)
        saved = _flat(getattr(meta, "tree", meta)["params"])
        wanted = _flat(abstract_state["params"])
        for name in sorted(set(saved) | set(wanted)):
            if name not in saved or name not in wanted:
                where = "only in the checkpoint" if name in saved else "missing from the checkpoint"
                raise CheckpointMismatch(f"checkpoint {self.directory}/{step} is of another model: parameter "
                                         f"{name} is {where}")
            (s_shape, s_dtype), (w_shape, w_dtype) = saved[name], wanted[name]
            if s_shape != w_shape or s_dtype != w_dtype:
                raise CheckpointMismatch(f"checkpoint {self.directory}/{step} is of another model: parameter {name} "
                                         f"is {s_dtype}{list(s_shape)} there, {w_dtype}{list(w_shape)} here")

    def restore(self, step: int, abstract_state):
        """(state, data_state) of checkpoint `step`; arrays land with `abstract_state`'s shardings.

        `abstract_state`: a pytree of jax.ShapeDtypeStruct with `.sharding` set (what
        `jax.eval_shape` gives, plus shardings), so each host reads only its shards.
        The data state returned is this process's.
        """
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
        restored = self.manager.restore(step, args=args)
        data = restored["data"] or {}
        if "processes" not in data:  # nothing saved for the iterator
            return restored["state"], data
        if data["process_count"] != jax.process_count():
            raise CheckpointMismatch(
                f"checkpoint {self.directory}/{step} was written by {data['process_count']} processes and its data "
                f"order cannot be split over {jax.process_count()}; resume with {data['process_count']} processes")
        return restored["state"], data["processes"][jax.process_index()]

    def wait(self) -> None:
        """Blocks until every pending save is on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_with_shardings(abstract_tree, shardings):
    """ShapeDtypeStructs of `abstract_tree` carrying the matching `shardings`."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings)
