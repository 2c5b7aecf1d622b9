"""Host-side agreement between processes: barriers and all-gathers of small JSON values.

They go through jax.distributed's coordination service (its key-value store and named
barriers), never through device collectives. A device collective issued from Python
(`multihost_utils.process_allgather`, `sync_global_devices`) is matched across processes
only by the order in which each process issues collectives; orbax's async save runs its
own barriers from a background thread, so the two orders can differ between processes
and a gather then returns another collective's bytes. Keys in the store are matched by
name, whatever thread or order they come from.

Every process must make the same calls in the same order (the n-th call of a tag on one
process meets the n-th call of that tag on the others). With one process they return at
once.
"""

from __future__ import annotations

import collections
import json

import jax

# How long a process waits for the others (they may be compiling, evaluating or saving).
TIMEOUT_MS = 30 * 60 * 1000

_calls: collections.Counter = collections.Counter()  # tag -> calls made so far by this process


def _client():
    from jax._src import distributed  # the coordination-service client jax.distributed.initialize() made

    client = distributed.global_state.client
    if client is None:
        raise RuntimeError("several JAX processes but no jax.distributed client: call jax.distributed.initialize() "
                           "first")
    return client


def _next(tag: str) -> int:
    n = _calls[tag]
    _calls[tag] += 1
    return n


def barrier(tag: str) -> None:
    """All processes wait here until every one has arrived."""
    if jax.process_count() > 1:
        _client().wait_at_barrier(f"zoo/barrier/{tag}/{_next(tag)}", TIMEOUT_MS)


def allgather_json(tag: str, obj) -> list:
    """Every process's JSON-able `obj`, in process order."""
    if jax.process_count() == 1:
        return [obj]
    client, n, me = _client(), _next(tag), jax.process_index()
    client.key_value_set(f"zoo/gather/{tag}/{n}/{me}", json.dumps(obj))
    values = [json.loads(client.blocking_key_value_get(f"zoo/gather/{tag}/{n}/{p}", TIMEOUT_MS))
              for p in range(jax.process_count())]
    if n:  # every process has posted call n, so each has read all of call n-1: this process's key can go
        client.key_value_delete(f"zoo/gather/{tag}/{n - 1}/{me}")
    return values
