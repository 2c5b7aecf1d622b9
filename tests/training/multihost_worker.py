"""One of the processes of test_multihost.py: `python multihost_worker.py <port> <process id> <rounds>`.

While a background thread issues device-collective barriers (as orbax's async save does),
the main thread gathers, barriers and agrees on a stop signal through zoo.multihost; it
prints one JSON line of what it saw.

The side thread makes a fixed number of collectives, the same on both processes, and is
joined before either process leaves: a collective its peer never joins (or one in flight
when the peer exits) aborts the process (gloo 'Connection reset by peer')."""

import json
import os
import sys
import threading

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

port, me, rounds = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=me)

from zoo import multihost  # noqa: E402
from zoo.training.distributed import StopRequest  # noqa: E402

SIDE = 3 * rounds
side_done = []


def collectives():  # device collectives from another thread, in their own order on each process
    for n in range(SIDE):
        multihost_utils.sync_global_devices(f"side-{n}")
        side_done.append(n)


side = threading.Thread(target=collectives, daemon=True)
side.start()
stop = StopRequest()
gathers, stops = [], []
for i in range(rounds):
    gathers.append(multihost.allgather_json("test", {"process": me, "round": i, "text": "x" * (i * me)}))
    if i % 10 == 0:
        multihost.barrier("test")
    if me == 1 and i == rounds // 2:
        stop.signal = "sigterm"  # only process 1 is signalled
    stops.append(stop.requested())
stop.close()
overlapped = len(side_done)  # side collectives finished while the main thread worked
side.join()
multihost.barrier("end")
print(json.dumps({"gathers": gathers, "stops": stops, "side": len(side_done), "overlapped": overlapped}),
      flush=True)
jax.distributed.shutdown()  # leave together: the coordination service lives in process 0
