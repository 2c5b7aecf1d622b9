"""`python -m benchmarks.plan`: will a training run fit a TPU slice? The CLI and the README table
over the planner in zoo/training/plan.py (which says how memory and FLOPs are counted).

    python -m benchmarks.plan --model llama3.1-8b --topology v5p:2x2x1 --mesh fsdp=-1 --batch-size 8 --seq-len 4096
    python -m benchmarks.plan --model llama3.1-70b --topology v5p-128 --batch-size 64 --seq-len 4096 --remat full
    python -m benchmarks.plan --table          # presets x slices -> results/plan_tpu.{json,md}
    python train.py --compile-only --topology v5p:4x4x4 --model llama3.1-70b --batch-size 64 --seq-len 4096

Topologies are libtpu names, GENERATION:SHAPE in chips ("v5e:2x2", "v5p:2x2x1",
"v6e:4x4", "v4:2x2x1"), or Cloud slice names ("v5p-8", "v5litepod-16", "v6e-256").
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import jax
from tqdm import tqdm

import zoo
from benchmarks.common import RESULTS_DIR, device_info, markdown_table, write_json
from kernels.api import CONTEXT_PARALLEL
from zoo import registry
from zoo.argtypes import positive_int
from zoo.configs import DTYPES, REMAT_POLICIES, parse_overrides, with_overrides
from zoo.training.plan import GIB, PlanError, canonical_topology, format_plan, plan, plan_with_remat

# ------------------------------------------------------------------------------- the table

# (preset, topology, mesh, global batch, seq_len, remat): 1B..175B on v5e, v5p and v6e slices.
# Batches give each device 1-4 rows; rows that do not fit are kept, they are answers too.
TABLE = (
    ("llama3.2-1b", "v5e:2x2", "fsdp=-1", 8, 4096, "none"),
    ("llama3.2-1b", "v5e:2x2", "fsdp=-1", 8, 4096, "full"),
    ("llama3.2-1b", "v6e:2x2", "fsdp=-1", 16, 4096, "full"),
    ("llama3.1-8b", "v5p:2x2x1", "fsdp=-1", 8, 4096, "full"),
    ("llama3.1-8b", "v5p:2x2x1", "fsdp=-1", 8, 4096, "none"),
    ("llama3.1-8b", "v5e:2x2", "fsdp=-1", 8, 4096, "full"),
    ("llama3.1-8b", "v5e:4x4", "fsdp=-1", 16, 4096, "full"),
    ("llama3.1-8b", "v6e:2x2", "fsdp=-1", 8, 4096, "full"),
    ("llama3.1-8b", "v6e:4x4", "fsdp=-1", 16, 4096, "full"),
    ("mixtral-8x7b", "v5p:2x2x2", "fsdp=-1", 8, 4096, "full"),
    ("mixtral-8x7b", "v5p:4x4x4", "fsdp=-1", 64, 4096, "full"),
    ("llama3.1-70b", "v5p:2x2x2", "fsdp=-1", 8, 4096, "full"),
    ("llama3.1-70b", "v5p:4x4x4", "fsdp=-1", 64, 4096, "full"),
    ("llama3.1-70b", "v6e:16x16", "fsdp=-1", 256, 4096, "full"),
    ("gpt3-175b", "v5p:4x4x8", "fsdp=-1", 128, 2048, "full"),
    ("gpt3-175b", "v5e:16x16", "fsdp=-1", 256, 2048, "full"),
    # the 2026 families: the smallest slice each fits (vocabularies of 256k make the logits big)
    ("gemma2-2b", "v6e:2x2", "fsdp=-1", 8, 4096, "full"),
    ("gemma2-9b", "v5p:2x2x1", "fsdp=-1", 8, 4096, "full"),
    ("gemma2-27b", "v5p:2x2x2", "fsdp=-1", 8, 4096, "full"),
    ("gemma3-1b", "v5e:2x2", "fsdp=-1", 4, 4096, "full"),
    ("gemma3-4b", "v6e:2x2", "fsdp=-1", 8, 4096, "full"),
    ("gemma3-12b", "v5p:2x2x1", "fsdp=-1", 8, 4096, "full"),
    ("gemma3-27b", "v5p:2x2x2", "fsdp=-1", 8, 4096, "full"),
    ("olmo2-7b", "v5p:2x2x1", "fsdp=-1", 8, 4096, "full"),
    ("smollm3-3b", "v5e:2x2", "fsdp=-1", 4, 4096, "full"),
    ("phi-3-mini", "v6e:2x2", "fsdp=-1", 8, 4096, "full"),
    ("phi-4", "v5p:2x2x1", "fsdp=-1", 8, 4096, "full"),
    ("phi-4-mini", "v6e:2x2", "fsdp=-1", 8, 4096, "full"),
    ("gpt-oss-20b", "v5p:2x2x2", "fsdp=-1", 8, 4096, "full"),
    ("gpt-oss-120b", "v5p:4x4x2", "fsdp=-1", 32, 4096, "full"),
    ("llama4-scout-17b-16e", "v5p:4x4x2", "fsdp=-1", 32, 4096, "full"),
    ("llama4-maverick-17b-128e", "v5p:4x4x8", "fsdp=-1", 128, 4096, "full"),
    # 256 experts, 8 per token: at one row per chip (fsdp=-1, batch 256) the compiler needs 290 GiB/chip even
    # with bfloat16 master weights; 32 rows with tensor=8 sharding the weights fit (bfloat16 master: README)
    ("deepseek-v3-671b", "v5p:4x8x8", "fsdp=32,tensor=8", 32, 4096, "full"),
    # encoders at their 512 positions, masked-LM objective
    ("roberta-large", "v5e:2x2", "fsdp=-1", 32, 512, "full"),
    ("xlm-roberta-large", "v5e:2x2", "fsdp=-1", 32, 512, "full"),
    ("modernbert-large", "v5e:2x2", "fsdp=-1", 16, 2048, "full"),
    # encoder-decoders: span corruption, 1024-token inputs
    ("mt5-xl", "v6e:2x2", "fsdp=-1", 8, 1024, "full"),
    ("umt5-xl", "v6e:2x2", "fsdp=-1", 8, 1024, "full"),
)
TABLE_COLUMNS = ["model", "params_b", "topology", "slice", "chips", "mesh", "batch", "seq", "remat", "hbm_gib",
                 "capacity_gib", "fits", "tflop_per_device", "compile_s"]


def slice_name(topology: str) -> str:
    """The Cloud slice name of a libtpu topology ("v5p:2x2x1" -> "v5p-8": v4/v5p count TensorCores)."""
    generation, shape = canonical_topology(topology).split(":")
    chips = math.prod(int(x) for x in shape.split("x"))
    return f"{generation}-{2 * chips if generation in ('v4', 'v5p') else chips}"


def _table_row(r: dict) -> dict:
    hbm = f"{r['hbm_bytes'] / GIB:.1f}" + (" (compiler OOM)" if r["status"] == "compiler OOM" else "")
    return {**r, "slice": slice_name(r["topology"]), "batch": r["batch_size"], "seq": r["seq_len"], "hbm_gib": hbm,
            "capacity_gib": f"{r['capacity_bytes'] / GIB:.0f}", "fits": "yes" if r["fits"] else "**no**",
            "tflop_per_device": r["flops_per_device"] / 1e12, "compile_s": f"{r['compile_s']:.0f}",
            "params_b": r["params"] / 1e9}


def run_table(rows=TABLE, *, presets=None, topologies=None, out_dir=None) -> dict:
    """Plans every row (skipping presets zoo does not have) and writes plan_tpu.json + .md."""
    chosen = [r for r in rows if (not presets or r[0] in presets)
              and (not topologies or canonical_topology(r[1]) in {canonical_topology(t) for t in topologies})]
    known = set(zoo.list_models())
    missing = sorted({r[0] for r in chosen if r[0] not in known})
    if missing:
        print(f"skipping presets zoo does not define (yet): {', '.join(missing)}")
    # With a filter, the saved rows of the rest of the table are kept (in TABLE's order).
    kept = _saved_rows(out_dir) if (presets or topologies) else {}
    planned = {_row_key(r[0], r[1], r[3], r[4], r[5]) for r in chosen}
    order = {_row_key(r[0], r[1], r[3], r[4], r[5]): i for i, r in enumerate(rows)}
    others = [r for k, r in kept.items() if k not in planned and k in order]
    results = []

    def merged():
        return sorted(others + results, key=lambda r: order.get(
            _row_key(r["model"], r["topology"], r["batch_size"], r["seq_len"], r["remat"]), len(order)))

    for name, topo, mesh, batch, seq, remat in tqdm([r for r in chosen if r[0] in known], desc="plans",
                                                    unit="compile", dynamic_ncols=True):
        cfg = zoo.config(name, remat=remat)  # each family trains its pretraining objective (BERT: mlm)
        r = plan(cfg, topo, mesh=mesh, batch_size=batch, seq_len=seq, objective=registry.of(cfg).objectives[0])
        tqdm.write(format_plan(r))
        results.append(r)
        write_table(merged(), out_dir)  # after every row: a long table survives an interruption
    payload = write_table(merged(), out_dir)
    print(Path(out_dir or RESULTS_DIR, "plan_tpu.md").read_text())
    return payload


def _row_key(model, topology, batch, seq, remat) -> tuple:
    return model, canonical_topology(topology), int(batch), int(seq), remat


def _saved_rows(out_dir=None) -> dict:
    """The rows of the saved plan_tpu.json, by (model, topology, batch, seq, remat); {} if none."""
    path = Path(out_dir or RESULTS_DIR, "plan_tpu.json")
    if not path.exists():
        return {}
    rows = json.loads(path.read_text()).get("rows", [])
    return {_row_key(r["model"], r["topology"], r["batch_size"], r["seq_len"], r["remat"]): r for r in rows}


def write_table(results: list[dict], out_dir=None) -> dict:
    """Writes plan_tpu.json (every field of every plan) and plan_tpu.md (the README table)."""
    payload = {"host": device_info(), "libtpu": _libtpu_version(), "jax_version": jax.__version__,
               "memory": "per device: arguments + outputs + temporaries - aliased (XLA memory_analysis)",
               "flops": "analytic 6*matmul params + 12*layers*heads*head_dim*attended keys (seq/2 causal) per token, "
                        "per device",
               "rows": results}
    path = write_json("plan_tpu", payload, out_dir or RESULTS_DIR)
    path.with_suffix(".md").write_text(markdown_table([_table_row(r) for r in results], TABLE_COLUMNS) + "\n")
    return payload


def _libtpu_version() -> str | None:
    try:
        return version("libtpu")
    except PackageNotFoundError:  # not installed under that distribution name
        return None


# ------------------------------------------------------------------------------ the CLIs


def build_parser() -> argparse.ArgumentParser:
    """Flags of `python -m benchmarks.plan`."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama3.1-8b", help="a zoo preset (default: %(default)s)")
    p.add_argument("--topology", default="v5p:2x2x1",
                   help="TPU topology or slice name, e.g. v5p:2x2x1, v5p-8, v5e:4x4, v6e:2x2; NxSLICE for N "
                        "slices over the data-center network, e.g. 2xv5p-8 (default: %(default)s)")
    p.add_argument("--mesh", default="fsdp=-1",
                   help="mesh axis sizes over the topology's devices, as train.py's --mesh (default: %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="global batch in rows (default: %(default)s)")
    p.add_argument("--seq-len", type=positive_int, default=4096, help="tokens per row (default: %(default)s)")
    p.add_argument("--grad-accum", type=positive_int, default=1, help="microbatches per step (default: %(default)s)")
    p.add_argument("--remat", choices=REMAT_POLICIES + ("auto",), default=None,
                   help="activation checkpointing per layer; 'auto' tries none, dots, full and keeps the first "
                        "that fits (up to 3 compiles). Default: the preset's")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="compute dtype (default: the preset's)")
    p.add_argument("--param-dtype", choices=DTYPES, default=None,
                   help="master weight and optimizer dtype (default: the preset's)")
    p.add_argument("--context-parallel", choices=CONTEXT_PARALLEL, default=None,
                   help="with a context axis in --mesh: allgather (k, v gathered) or ring (k/v blocks passed "
                        "around the ring), as train.py's --context-parallel (default: the preset's, allgather)")
    p.add_argument("--objective", default="clm", help="training objective (default: %(default)s)")
    p.add_argument("--override", nargs="+", default=[], metavar="FIELD=VALUE",
                   help="model config fields, as train.py's --override (e.g. loss_vocab_block=0)")
    p.add_argument("--table", action="store_true",
                   help="plan the README table (presets x v5e/v5p/v6e slices) and write results/plan_tpu.json/.md")
    p.add_argument("--presets", nargs="+", default=None, help="with --table: only these presets")
    p.add_argument("--topologies", nargs="+", default=None, help="with --table: only these topologies")
    p.add_argument("--out", default=None, help="results directory (default: benchmarks/results)")
    p.add_argument("--json", default=None, help="also write the single plan to this JSON file")
    return p


def main(argv=None):
    """CLI entry point: one plan (printed), or --table."""
    args = build_parser().parse_args(argv)
    try:
        if args.table:
            return run_table(presets=args.presets, topologies=args.topologies, out_dir=args.out)
        overrides = {k: v for k, v in (("dtype", args.dtype), ("param_dtype", args.param_dtype),
                                       ("context_parallel", args.context_parallel)) if v}
        cfg = with_overrides(zoo.config(args.model, **overrides), parse_overrides(args.override))
        result = plan_with_remat(cfg, args.topology, args.remat, mesh=args.mesh, batch_size=args.batch_size,
                                 seq_len=args.seq_len, grad_accum=args.grad_accum, objective=args.objective)
    except (PlanError, ValueError) as e:
        print(f"plan: error: {e}", file=sys.stderr)
        return 2
    print(format_plan(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # libtpu would otherwise look for TPU hardware
    out = main(sys.argv[1:])
    sys.exit(out if isinstance(out, int) else 0)
