"""Shared benchmark helpers: synchronised timing, device description, matmul peak,
and result files (JSON + PNG) under benchmarks/results/."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from zoo.training.step import mesh_context

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def time_fn(fn, *args, warmup: int = 2, repeats: int = 5) -> dict:
    """Median/min wall time of `fn(*args)` after warm-up, each call blocked until done."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "repeats": repeats}


def time_train_steps(trainer, mesh, host_batches: list[dict], *, warmup: int, steps: int, seed: int = 0):
    """(final state, last metrics, seconds for `steps` steps) of train.py's step from a fresh init.

    The host batches are put on the devices once and alternated, so the timed loop does
    no host work; warm-up steps run first and everything is synchronised before timing.
    """
    batches = [{k: jax.device_put(v, trainer.batch_sharding) for k, v in b.items()} for b in host_batches]
    with mesh_context(mesh):
        state = trainer.init(jax.random.PRNGKey(seed))
        for i in range(warmup):
            state, metrics = trainer.step(state, batches[i % len(batches)])
        jax.block_until_ready(state)
        t0 = time.perf_counter()
        for i in range(steps):
            state, metrics = trainer.step(state, batches[i % len(batches)])
        jax.block_until_ready((state, metrics))
        return state, metrics, time.perf_counter() - t0


def device_info() -> dict:
    """What the figures were measured on: device kind, count, jax version, host, date."""
    dev = jax.devices()[0]
    return {
        "platform": dev.platform,
        "device_kind": dev.device_kind,
        "device_count": jax.device_count(),
        "jax_version": jax.__version__,
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "date": datetime.date.today().isoformat(),
        # CPU figures on a shared host depend on what else runs: the 1-minute load average says how busy it was
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def matmul_peak_tflops(dtype=jnp.bfloat16, size: int | None = None, repeats: int = 5) -> float:
    """Measured dense matmul throughput (TFLOP/s), the denominator of '% of peak'."""
    if size is None:
        size = 1024 if jax.devices()[0].platform == "cpu" else 8192
    dtype = jnp.float32 if jax.devices()[0].platform == "cpu" else dtype
    a = jnp.ones((size, size), dtype)
    f = jax.jit(lambda x, y: x @ y)
    t = time_fn(f, a, a, warmup=2, repeats=repeats)["median_s"]
    return 2 * size**3 / t / 1e12


def write_json(name: str, payload: dict, out_dir: Path | None = None) -> Path:
    """Writes results/<name>.json (pretty, sorted keys) and returns its path."""
    out_dir = Path(out_dir or RESULTS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
    return path


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """A GitHub markdown table of `rows` restricted to `columns`."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"
        if isinstance(v, int) and not isinstance(v, bool):
            return f"{v:,}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
