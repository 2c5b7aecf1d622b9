"""Multi-process start-up, barriers, and stopping cleanly on SIGTERM / Ctrl-C."""

from __future__ import annotations

import os
import signal
import sys

import jax

from zoo import multihost

# Exit status after Ctrl-C (128 + SIGINT, the shell's convention): the run checkpointed and stopped.
INTERRUPTED = 130


# Environment variables that mark a multi-process job jax.distributed.initialize() can
# configure by itself (TPU pod slices, Slurm, Open MPI, an explicit coordinator).
_CLUSTER_ENV = ("MEGASCALE_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS", "OMPI_COMM_WORLD_SIZE", "SLURM_NTASKS")


def _cluster_detected() -> bool:
    if "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):  # a multi-host TPU slice
        return True
    for name in _CLUSTER_ENV:
        value = os.environ.get(name, "")
        if value and (not value.isdigit() or int(value) > 1):
            return True
    return False


def init_distributed(config) -> None:
    """jax.distributed.initialize() for multi-process runs; must run before JAX touches a device."""
    if config.coordinator is not None:  # TrainConfig.validate checked the three go together
        if config.num_processes > 1:
            jax.distributed.initialize(coordinator_address=config.coordinator, num_processes=config.num_processes,
                                       process_id=config.process_id)
    elif _cluster_detected():
        jax.distributed.initialize()


class NonFiniteStop(Exception):
    """Too many consecutive non-finite steps: the run saved its last good state and stopped."""


class StopRequest:
    """SIGTERM (preemption) and Ctrl-C (SIGINT) set a flag the loop polls between steps: the
    run finishes its step, checkpoints and stops. A second Ctrl-C aborts at once (the newest
    complete checkpoint stays usable). With several processes they agree: any one signalled
    stops them all at the same step."""

    def __init__(self):
        self.signal = None  # "sigterm" or "sigint" once one arrived
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        if signum == signal.SIGINT:
            if self.signal == "sigint":
                print("\ntrain.py: second Ctrl-C: aborted without saving; the newest complete checkpoint is kept",
                      file=sys.stderr, flush=True)
                os._exit(INTERRUPTED)
            print("\ntrain.py: Ctrl-C: finishing this step and saving a checkpoint (Ctrl-C again to abort at once)",
                  file=sys.stderr, flush=True)
        self.signal = self.signal or ("sigint" if signum == signal.SIGINT else "sigterm")

    @property
    def signalled(self) -> bool:
        return self.signal is not None

    def requested(self) -> str | None:
        """The signal that stops the run ("sigterm" / "sigint"), agreed by all processes, or None."""
        if jax.process_count() == 1:
            return self.signal
        signals = multihost.allgather_json("stop", self.signal)
        return "sigint" if "sigint" in signals else "sigterm" if "sigterm" in signals else None

    def close(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def barrier(name: str) -> None:
    """All processes wait here (a no-op with one process)."""
    multihost.barrier(name)
