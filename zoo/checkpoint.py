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

import os

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Async save every N steps, keep the last K, restore sharded state + data-iterator state."""

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=True)
        self.manager = ocp.CheckpointManager(self.directory, item_names=("state", "data"), options=options)

    def latest_step(self) -> int | None:
        """The step of the newest complete checkpoint, or None."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of every complete checkpoint kept, ascending."""
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, data_state: dict | None) -> None:
        """Starts an async save of `state` (a pytree of jax.Arrays) and the iterator state."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state or {}))
        self.manager.save(step, args=args, force=True)

    def restore(self, step: int, abstract_state):
        """(state, data_state) of checkpoint `step`; arrays land with `abstract_state`'s shardings.

        `abstract_state`: a pytree of jax.ShapeDtypeStruct with `.sharding` set (what
        `jax.eval_shape` gives, plus shardings), so each host reads only its shards.
        """
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
        restored = self.manager.restore(step, args=args)
        return restored["state"], restored["data"]

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
