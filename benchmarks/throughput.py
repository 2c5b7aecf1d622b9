"""Training throughput across model sizes: tokens/s, MFU, peak device memory, compile time.

Every figure is train.py's own step (zoo.training.step.make_trainer: the one shared, sharded,
donating step) on synthetic tokens (uniform random ids, one document per row), over
the local devices with --mesh (default fsdp=-1).

    tokens/s  = batch * seq_len * steps / wall time of `steps` steps after `warmup`
                steps (dispatch is pipelined as in train.py; the clock stops when the
                last step's outputs are ready)
    MFU       = cfg.flops_per_token(seq_len) * tokens/s / (devices * peak FLOP/s per device)
                flops_per_token = 6 * matmul params + 12 * layers * heads * head_dim * keys,
                keys = seq_len / 2 for causal attention (MaxText/FlashAttention convention)
                (as train.py logs it); the peak comes from
                zoo.training.metrics.peak_flops_per_device: the vendor dense bf16 figure on GPU/TPU, a
                float32 matmul measured on this host on CPU (so CPU MFU is relative to
                what XLA's CPU matmul reaches here, not to a datasheet)
    memory    = GPU/TPU: peak_bytes_in_use of the device allocator after the run (max
                over local devices). CPU has no allocator statistics: the compiled step's
                per-device memory_analysis (arguments + outputs + temporaries - aliased)
                is reported instead, and recorded on every platform as `compiled_bytes`
    compile   = wall time of make_trainer (trace, lower and compile the step)

    python -m benchmarks.throughput                      # tiny presets on CPU (the README table)
    python -m benchmarks.throughput --large              # gpt2-124m..1.5b, llama3.2-1b/3b, llama3.1-8b
    python -m benchmarks.throughput --models gpt2-124m --batch-size 16 --seq-len 1024

With --large, a model whose compiled step needs more memory than a device has is
recorded as "does not fit" instead of being run.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import jax
import numpy as np
from tqdm import tqdm

import zoo
from benchmarks.common import RESULTS_DIR, device_info, markdown_table, time_train_steps, write_json
from zoo import data
from zoo.argtypes import non_negative_int, positive_int
from zoo.sharding import make_mesh
from zoo.training.metrics import peak_flops_per_device
from zoo.training.optimizer import OptimConfig
from zoo.training.step import make_trainer

CPU_MODELS = ("tiny-gpt2", "tiny-llama", "small-llama", "gpt2-124m")
LARGE_MODELS = ("gpt2-124m", "gpt2-350m", "gpt2-774m", "gpt2-1.5b", "llama3.2-1b", "llama3.2-3b", "llama3.1-8b")
TABLE_COLUMNS = ["model", "params_m", "devices", "batch", "seq_len", "dtype", "tokens_per_s", "mfu_pct", "step_ms",
                 "compile_s", "peak_memory_mib", "memory_source"]


def _device_capacity(devices) -> int | None:
    """Bytes one device can hold (accelerator allocator limit; CPU: physical RAM over local devices)."""
    stats = devices[0].memory_stats() or {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // len(devices)
    except (ValueError, OSError):
        return None


def measure(cfg, mesh, *, batch_size: int, seq_len: int, steps: int, warmup: int, peak: float, seed: int = 0) -> dict:
    """Compiles train.py's step for `cfg` on `mesh`, runs it on synthetic tokens, returns the figures."""
    devices = mesh.devices.flatten().tolist()
    opt = OptimConfig(warmup_steps=0, decay_steps=max(steps + warmup, 1))
    t0 = time.perf_counter()
    trainer = make_trainer(cfg, mesh, opt, batch_size=batch_size, seq_len=seq_len)
    compile_s = time.perf_counter() - t0
    mem = trainer.step.memory_analysis()
    compiled_bytes = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                      - mem.alias_size_in_bytes)
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(trainer.abstract_state["params"]))
    row = dict(model=cfg.name, params=n_params, params_m=n_params / 1e6, devices=len(devices), batch=batch_size,
               seq_len=seq_len, dtype=cfg.dtype, param_dtype=cfg.param_dtype, remat=cfg.remat,
               compile_s=compile_s, compiled_bytes=compiled_bytes,
               flops_per_token=cfg.flops_per_token(seq_len), peak_flops_per_device=peak)
    capacity = _device_capacity(devices)
    if capacity and compiled_bytes > capacity:
        row.update(status="does not fit", capacity_bytes=capacity)
        return row

    it = data.SyntheticIterator(vocab_size=cfg.vocab_size, seq_len=seq_len, batch_size=batch_size, seed=seed)
    state, metrics, elapsed = time_train_steps(trainer, mesh, [next(it), next(it)], warmup=warmup, steps=steps,
                                               seed=seed)
    loss = float(np.asarray(jax.device_get(metrics["loss"])))
    tokens_per_s = batch_size * seq_len * steps / elapsed
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in devices]
    device_peak = max(peaks) if all(p is not None for p in peaks) else None
    row.update(status="ok", steps=steps, warmup=warmup, step_ms=1e3 * elapsed / steps, tokens_per_s=tokens_per_s,
               mfu=row["flops_per_token"] * tokens_per_s / (len(devices) * peak), final_loss=loss,
               device_peak_bytes=device_peak,
               peak_memory_bytes=device_peak if device_peak is not None else compiled_bytes,
               memory_source="device peak_bytes_in_use" if device_peak is not None else "compiled memory_analysis")
    row["mfu_pct"] = 100 * row["mfu"]
    row["peak_memory_mib"] = row["peak_memory_bytes"] / 2**20
    del state
    return row


def plot(rows, path):
    """Two panels against parameter count: tokens/s and MFU."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = sorted((r for r in rows if r["status"] == "ok"), key=lambda r: r["params"])
    if not ok:
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    x = [r["params"] for r in ok]
    a.plot(x, [r["tokens_per_s"] for r in ok], marker="o")
    b.plot(x, [r["mfu_pct"] for r in ok], marker="o")
    for r in ok:
        a.annotate(r["model"], (r["params"], r["tokens_per_s"]), fontsize=7, textcoords="offset points",
                   xytext=(3, 3))
        b.annotate(r["model"], (r["params"], r["mfu_pct"]), fontsize=7, textcoords="offset points", xytext=(3, 3))
    for ax, label in ((a, "train tokens/s"), (b, "MFU (%)")):
        ax.set_xscale("log")
        ax.set_xlabel("parameters")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    a.set_yscale("log")
    dev = ok[0]
    fig.suptitle(f"train.py step, batch {dev['batch']} x {dev['seq_len']}, {dev['devices']} device(s)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def build_parser() -> argparse.ArgumentParser:
    """Flags of `python -m benchmarks.throughput` (defaults depend on the backend)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=None,
                   help=f"presets to measure (default on CPU: {' '.join(CPU_MODELS)}; elsewhere: the --large list)")
    p.add_argument("--large", action="store_true", help=f"measure {' '.join(LARGE_MODELS)} (where memory allows)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="global batch in rows (default: 8)")
    p.add_argument("--seq-len", type=positive_int, default=None,
                   help="tokens per row (default: 128 on CPU, 1024 elsewhere)")
    p.add_argument("--steps", type=positive_int, default=None, help="timed steps (default: 3 on CPU, 20 elsewhere)")
    p.add_argument("--warmup", type=non_negative_int, default=None,
                   help="untimed steps after compiling (default: 1 on CPU, 3 elsewhere)")
    p.add_argument("--devices", type=positive_int, default=None, help="use the first N local devices (default: all)")
    p.add_argument("--mesh", default="fsdp=-1", help="mesh over the local devices, as train.py's --mesh "
                                                     "(default: %(default)s)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="compute dtype for every model (default: each preset's)")
    p.add_argument("--remat", default=None, help="activation checkpointing policy (default: each preset's)")
    p.add_argument("--peak-flops", type=float, default=None,
                   help="peak FLOP/s per device for MFU (default: train.py's table, or measured on CPU)")
    p.add_argument("--out", default=str(RESULTS_DIR), help="results directory (default: benchmarks/results)")
    p.add_argument("--name", default=None, help="result file stem (default: throughput_<platform>)")
    return p


def main(argv=None) -> dict:
    """Measures every model, prints the table and writes <name>.json, .png and .md."""
    args = build_parser().parse_args(argv)
    platform = jax.devices()[0].platform
    cpu = platform == "cpu"
    models = args.models or (list(LARGE_MODELS) if args.large or not cpu else list(CPU_MODELS))
    batch = args.batch_size or 8
    seq_len = args.seq_len or (128 if cpu else 1024)
    steps = args.steps or (3 if cpu else 20)
    warmup = args.warmup if args.warmup is not None else (1 if cpu else 3)
    peak, peak_source = peak_flops_per_device(args.peak_flops)
    mesh = make_mesh(args.mesh, devices=jax.devices()[: args.devices] if args.devices else None)
    rows = []
    for name in tqdm(models, desc="models", unit="model", dynamic_ncols=True):
        overrides = {k: v for k, v in (("dtype", args.dtype), ("remat", args.remat)) if v}
        cfg = zoo.config(name, **overrides)
        try:
            row = measure(cfg, mesh, batch_size=batch, seq_len=min(seq_len, cfg.max_seq_len), steps=steps,
                          warmup=warmup, peak=peak)
        except Exception as e:  # an allocator OOM on an accelerator: recorded, the sweep goes on
            if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
                raise
            row = dict(model=name, params=zoo.param_count(cfg), status="out of memory",
                       reason=str(e).splitlines()[0][:200])
        rows.append(row)
        shown = (f"{row['tokens_per_s']:,.0f} tokens/s, MFU {row['mfu_pct']:.1f}%, {row['step_ms']:.1f} ms/step, "
                 f"compile {row['compile_s']:.1f}s, memory {row['peak_memory_mib']:.1f} MiB") \
            if row["status"] == "ok" else row["status"]
        tqdm.write(f"{name:>14} {row['params'] / 1e6:9.2f}M params: {shown}")
        jax.clear_caches()
    dev = device_info()
    payload = dict(device=dev, peak_flops_per_device=peak, peak_flops_source=peak_source, mesh=args.mesh,
                   mfu_formula="flops_per_token(seq_len) * tokens_per_s / (devices * peak_flops_per_device); "
                               "flops_per_token = 6 * matmul params + 12 * layers * heads * head_dim * keys "
                               "(seq_len / 2 causal)",
                   rows=rows)
    path = write_json(args.name or f"throughput_{platform}", payload, args.out)
    png = plot(rows, path.with_suffix(".png"))
    table = markdown_table([r for r in rows if r["status"] == "ok"], TABLE_COLUMNS)
    skipped = [f"{r['model']}: {r['status']}" for r in rows if r["status"] != "ok"]
    md = path.with_suffix(".md")
    md.write_text(f"{dev['device_kind']} x {dev['device_count']}, jax {dev['jax_version']}, {dev['date']}; "
                  f"MFU peak {peak / 1e12:.3g} TFLOP/s/device ({peak_source})\n\n" + table + "\n"
                  + "".join(f"\n- {s}" for s in skipped) + ("\n" if skipped else ""))
    print(table)
    print(f"wrote {path}, {md}" + (f" and {png}" if png else ""))
    return payload


if __name__ == "__main__":
    main(sys.argv[1:])
