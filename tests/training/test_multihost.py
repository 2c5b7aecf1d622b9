"""zoo.multihost across two real processes (jax.distributed over 127.0.0.1): gathers return
every process's value in process order, and a stop signal on one process stops both at the
same round, while another thread issues device collectives (as orbax's async save does)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from test_faults import _free_port

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
ROUNDS = 60


def test_gathers_and_stop_agreement_across_two_processes_beside_device_collectives():
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1")
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "multihost_worker.py"), str(port), str(i),
                               str(ROUNDS)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    try:
        outs = [p.communicate(timeout=180) for p in procs]
    finally:
        for p in procs:
            p.kill()
    seen = []
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        seen.append(json.loads(out.strip().splitlines()[-1]))
    expected = [[{"process": p, "round": i, "text": "x" * (i * p)} for p in range(2)] for i in range(ROUNDS)]
    half = ROUNDS // 2
    for s in seen:
        assert s["side"] == 3 * ROUNDS and s["overlapped"] > 0  # device collectives ran beside the gathers
        assert s["gathers"] == expected
        assert s["stops"] == [None] * half + ["sigterm"] * (ROUNDS - half)
