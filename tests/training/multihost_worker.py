"""One of the processes of test_multihost.py: `python multihost_worker.py <port> <process id> <rounds>`.

While a background thread keeps issuing device-collective barriers (as orbax's async save
does), the main thread gathers, barriers and agrees on a stop signal through zoo.multihost;
it prints one JSON line of what it saw."""

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

done = threading.Event()


def collectives():  # device collectives from another thread, in their own order on each process
    n = 0
    while not done.is_set():
        multihost_utils.sync_global_devices(f"side-{n}")
        n += 1


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
multihost.barrier("end")  # both main threads are done before either side thread stops
done.set()
print(json.dumps({"gathers": gathers, "stops": stops}), flush=True)
os._exit(0)  # the side thread may be inside a collective its peer already left
