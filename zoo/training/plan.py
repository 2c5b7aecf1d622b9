"""The AOT planner (`train.py --compile-only`; `python -m benchmarks.plan` is its CLI and table):
will a training run fit a TPU slice? Answered on this CPU host, no TPU needed.

The FULL train step of train.py (zoo.training.step.make_trainer: the same model, optimizer, jit,
shardings and donation as a real run) is lowered and compiled for a TPU topology
described by libtpu (jax.experimental.topologies), then XLA's own memory analysis of
the per-device program is read back:

    per-device HBM = arguments + outputs + temporaries - aliased (donated state)

and compared with the chip's HBM (CHIP_HBM_GIB). "fits" means that figure is at most
the capacity; the runtime also needs some HBM of its own (a few hundred MiB), so a
plan within ~2% of the capacity is a gamble.

FLOPs are analytic: cfg.flops_per_token(seq_len) * tokens, i.e. 6 * matmul params +
12 * layers * heads * head_dim * keys per token, keys = seq_len / 2 for causal attention
(PaLM's count with MaxText's and FlashAttention's causal half; the MFU numerator of
train.py), divided over the devices. XLA's cost_analysis counts the body
of each loop once (layers are a scan), so its figure is printed beside it, not used.

    python train.py --compile-only --topology v5p:4x4x4 --model llama3.1-70b --batch-size 64 --seq-len 4096

Topologies are libtpu names, GENERATION:SHAPE in chips ("v5e:2x2", "v5p:2x2x1",
"v6e:4x4", "v4:2x2x1"), or Cloud slice names ("v5p-8", "v5litepod-16", "v6e-256").
v5p-N and v4-N count TensorCores (2 per chip): v5p-8 is 4 chips, v5p:2x2x1.
"""

from __future__ import annotations

import functools
import math
import os
import re
import sys
import time

import jax
import numpy as np
from jax.experimental import topologies

import zoo
from zoo import objectives, registry
from zoo.sharding import check_divisible, make_mesh
from zoo.training.collectives import dcn_transfers
from zoo.training.config import TrainConfig, UsageError
from zoo.training.context import check_context
from zoo.training.metrics import PEAK_FLOPS
from zoo.training.optimizer import OptimConfig
from zoo.training.pretrain import load_model_config
from zoo.training.step import batch_shards, make_trainer

GIB = 1024**3

# HBM per chip (GiB). libtpu shows v4 as 2 devices per chip (one per TensorCore), each
# with half the chip's HBM; the others as one device per chip.
CHIP_HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
_GENERATION_OF_PREFIX = {"v4": "v4", "v5e": "v5e", "v5litepod": "v5e", "v5lite": "v5e", "v5p": "v5p", "v6e": "v6e"}
# Cloud slice sizes -> chip grid. 3D tori (v4, v5p) grow z, then y, then x; 2D (v5e, v6e) alternate.
_GRID_3D = {1: "1x1x1", 2: "1x2x1", 4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
            256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
_GRID_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}


class PlanError(ValueError):
    """A plan that cannot be made (bad topology, mesh, batch): one line, before compiling."""


def split_slices(name: str) -> tuple[int, str]:
    """(slices, one slice's name) of a multi-slice topology "NxSLICE" ("2xv5p-8": 2 v5p-8 slices
    joined over the data-center network); (1, name) for one slice."""
    m = re.fullmatch(r"(\d+)x(v.*)", name.strip().lower())
    return (int(m.group(1)), m.group(2)) if m else (1, name)


def canonical_topology(name: str) -> str:
    """libtpu's GENERATION:SHAPE name for a topology or Cloud slice name ("v5p-8" -> "v5p:2x2x1"),
    prefixed "Nx" for N slices ("2xv5p-8" -> "2xv5p:2x2x1")."""
    slices, name = split_slices(name)
    if slices != 1:
        if slices < 1:
            raise PlanError(f"topology {slices}x{name}: the number of slices must be positive")
        return f"{slices}x{canonical_topology(name)}"
    name = name.strip().lower()
    m = re.fullmatch(r"(v4|v5e|v5p|v6e|v5litepod|v5lite):(\d+(?:x\d+)+)", name)
    if m:
        return f"{_GENERATION_OF_PREFIX[m.group(1)]}:{m.group(2)}"
    m = re.fullmatch(r"(v4|v5e|v5p|v6e|v5litepod)-(\d+)", name)
    if not m:
        raise PlanError(f"unknown TPU topology {name!r}: expected e.g. v5p:2x2x1, v5e:4x4, v6e:2x2 or v5p-8 "
                        "(2xv5p-8: two slices)")
    generation, count = _GENERATION_OF_PREFIX[m.group(1)], int(m.group(2))
    if generation in ("v4", "v5p"):
        if count % 2 or count // 2 not in _GRID_3D:
            raise PlanError(f"{name}: {generation}-N counts TensorCores (2 per chip); N must be 2 * one of "
                            f"{sorted(_GRID_3D)}")
        return f"{generation}:{_GRID_3D[count // 2]}"
    if count not in _GRID_2D:
        raise PlanError(f"{name}: {generation} slices have one of {sorted(_GRID_2D)} chips")
    return f"{generation}:{_GRID_2D[count]}"


@functools.lru_cache(maxsize=None)
def topology_devices(name: str) -> tuple:
    """The abstract TPU devices of a topology, from libtpu (cached: one description per name)."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # tests and the user's run may share a host
    slices, canonical = split_slices(canonical_topology(name))
    kwargs = {"num_slices": slices} if slices > 1 else {}
    try:
        return tuple(topologies.get_topology_desc(platform="tpu", topology_name=canonical, **kwargs).devices)
    except Exception as e:  # libtpu missing, or a shape it does not know
        raise PlanError(f"libtpu cannot describe topology {canonical_topology(name)}: {str(e).splitlines()[0][:200]} "
                        "(pip install libtpu)") from None


def chip_info(name: str) -> dict:
    """Generation, device kind, devices per chip, HBM and peak bf16 FLOP/s per device of a topology."""
    canonical = canonical_topology(name)
    generation = split_slices(canonical)[1].split(":")[0]
    devices = topology_devices(canonical)
    chips = len({(getattr(d, "slice_index", 0), tuple(d.coords)) for d in devices})
    per_chip = len(devices) // chips
    kind = devices[0].device_kind
    peak = next((flops for sub, flops in PEAK_FLOPS if sub.lower() in kind.lower()), None)
    return {"topology": canonical, "generation": generation, "device_kind": kind, "devices": len(devices),
            "chips": chips, "devices_per_chip": per_chip, "hbm_bytes_per_chip": CHIP_HBM_GIB[generation] * GIB,
            "hbm_bytes_per_device": CHIP_HBM_GIB[generation] * GIB // per_chip,
            "peak_flops_per_device": peak / per_chip if peak else None}


def _local_info() -> dict:
    """chip_info's fields for this host's own devices (capacity from memory_stats where exposed)."""
    devices = jax.devices()
    stats = devices[0].memory_stats() or {}
    kind = devices[0].device_kind
    peak = next((flops for sub, flops in PEAK_FLOPS if sub.lower() in kind.lower()), None)
    return {"topology": f"local {devices[0].platform}", "generation": devices[0].platform, "device_kind": kind,
            "devices": len(devices), "chips": len(devices), "devices_per_chip": 1,
            "hbm_bytes_per_chip": stats.get("bytes_limit"), "hbm_bytes_per_device": stats.get("bytes_limit"),
            "peak_flops_per_device": peak}


def _mesh_text(mesh) -> str:
    shape = {k: v for k, v in mesh.shape.items() if v > 1}
    return ",".join(f"{k}={v}" for k, v in shape.items()) or "single device"


def plan(cfg, topology: str | None, *, mesh: str = "fsdp=-1", batch_size: int, seq_len: int,
         objective: str = "clm", grad_accum: int = 1, z_loss: float = 0.0, opt=None) -> dict:
    """AOT-compiles train.py's step for `topology` (None: this host's devices) and reports memory and FLOPs.

    Returns a dict with the per-device memory components (bytes), `hbm_bytes` (arguments
    + outputs + temporaries - aliased), `capacity_bytes`, `fits`, analytic and
    XLA-counted FLOPs, the compile time and the parameter count. Raises PlanError for
    inputs that cannot work, before compiling.
    """
    info = chip_info(topology) if topology else _local_info()
    devices = list(topology_devices(topology)) if topology else jax.devices()
    try:
        objectives.get(objective)
        if objective not in registry.of(cfg).objectives:
            trains = ", ".join(registry.supporting(objective=objective))
            raise PlanError(f"objective {objective} trains {trains} models, not {cfg.family}")
        if seq_len > cfg.max_seq_len:
            raise PlanError(f"seq_len {seq_len} exceeds max_seq_len={cfg.max_seq_len} of model {cfg.name!r}")
        the_mesh = make_mesh(mesh, devices=devices)
        check_divisible(cfg, the_mesh)
        check_context(cfg, objective, the_mesh, seq_len)
    except PlanError:
        raise
    except ValueError as e:
        raise PlanError(str(e)) from None
    shards = batch_shards(the_mesh)
    if batch_size % grad_accum or (batch_size // grad_accum) % shards:
        raise PlanError(f"batch {batch_size} / grad_accum {grad_accum} does not split over the {shards} batch "
                        f"shards (data*fsdp*expert) of mesh {_mesh_text(the_mesh)}")

    n = len(devices)
    capacity = info["hbm_bytes_per_device"]
    flops_step = cfg.flops_per_token(seq_len) * batch_size * seq_len
    peak = info["peak_flops_per_device"]
    result = {
        "model": cfg.name, "remat": cfg.remat, "dtype": cfg.dtype, "param_dtype": cfg.param_dtype,
        "topology": info["topology"], "device_kind": info["device_kind"], "devices": n, "chips": info["chips"],
        "mesh": _mesh_text(the_mesh), "batch_size": batch_size, "seq_len": seq_len, "grad_accum": grad_accum,
        "objective": objective, "capacity_bytes": capacity,
        "flops_per_step": flops_step, "flops_per_device": flops_step / n, "peak_flops_per_device": peak,
        "step_s_at_peak": flops_step / n / peak if peak else None,
    }
    t0 = time.time()
    try:
        trainer = make_trainer(cfg, the_mesh, opt or OptimConfig(), objective=objective,
                                     batch_size=batch_size, seq_len=seq_len, grad_accum=grad_accum, z_loss=z_loss)
    except jax.errors.JaxRuntimeError as e:
        # The TPU compiler refuses a program that cannot fit, naming the HBM it needs per device
        # (its figure is the whole program's: a plan that compiles to arguments + temporaries of
        # X GiB is refused on a smaller chip with "temporaries X GiB").
        oom = _compiler_oom(str(e))
        if oom is None:
            raise
        n_params = zoo.param_count(cfg)
        result.update(status="compiler OOM", params=n_params, compile_s=time.time() - t0,
                      hbm_bytes=oom["required"], compiler_available_bytes=oom["available"],
                      state_bytes_per_device=3 * n_params * jnp_itemsize(cfg.param_dtype) / n,  # even shards
                      fits=False, message=oom["message"])
        return result
    compile_s = time.time() - t0
    mem = trainer.step.memory_analysis()
    cost = trainer.step.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
    hbm = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
           - mem.alias_size_in_bytes)
    result.update(
        status="compiled", compile_s=compile_s,
        params=sum(math.prod(x.shape) for x in jax.tree.leaves(trainer.abstract_state["params"])),
        # the train state one device holds: each leaf's shard (replicated leaves count whole)
        state_bytes_per_device=sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
                                   for x in jax.tree.leaves(trainer.abstract_state)),
        argument_bytes=mem.argument_size_in_bytes, output_bytes=mem.output_size_in_bytes,
        temp_bytes=mem.temp_size_in_bytes, alias_bytes=mem.alias_size_in_bytes,
        generated_code_bytes=mem.generated_code_size_in_bytes, hbm_bytes=hbm,
        fits=None if capacity is None else bool(hbm <= capacity),
        xla_flops_per_device=cost.get("flops"))
    if len({getattr(d, "slice_index", 0) for d in devices}) > 1:
        try:
            result["dcn_transfers"] = dcn_transfers(trainer.step.as_text())
        except jax.errors.JaxRuntimeError as e:  # jax 0.10.2 cannot print some large TPU programs
            result["dcn_transfers"], result["dcn_note"] = None, str(e).splitlines()[0][:160]
    return result


def jnp_itemsize(dtype: str) -> int:
    """Bytes per element of a dtype name."""
    return 2 if dtype in ("bfloat16", "float16") else np.dtype(dtype).itemsize


_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40, "P": 2**50, "E": 2**60}


def _compiler_oom(message: str) -> dict | None:
    """Required and available bytes from an XLA:TPU compile-time HBM OOM message (None if it is not one)."""
    if "RESOURCE_EXHAUSTED" not in message:
        return None
    size = r"([\d.]+)([KMGTPE]?)(?:i?B)?"
    for pattern in (r"required for HLO temporaries \(" + size + r"\) exceeds available HBM \(" + size + r"\)",
                    r"Requires " + size + r", has " + size + r" available",
                    r"Used " + size + r" of " + size + r" hbm"):
        m = re.search(pattern, message)
        if m:
            req = float(m.group(1)) * _UNITS[m.group(2)]
            avail = float(m.group(3)) * _UNITS[m.group(4)]
            line = next((l for l in message.splitlines() if "RESOURCE_EXHAUSTED" in l), message)[:300]
            return {"required": int(req), "available": int(avail), "message": line.strip()}
    return None


def plan_with_remat(cfg, topology, remat: str, **kwargs) -> dict:
    """plan(), with remat "auto" trying none, dots, full in turn and keeping the first that fits."""
    if remat != "auto":
        return plan(cfg.replace(remat=remat) if remat else cfg, topology, **kwargs)
    result = None
    for policy in ("none", "dots", "full"):
        result = plan(cfg.replace(remat=policy), topology, **kwargs)
        if result["fits"] is not False:
            break
    return result


def format_plan(r: dict) -> str:
    """The human-readable report of one plan()."""
    small = (r.get("hbm_bytes") or 0) < GIB / 10
    g = lambda b: f"{b / 2**20:.2f} MiB" if small else f"{b / GIB:.2f} GiB"  # noqa: E731
    size = f"{r['params'] / 1e9:.3g}B" if r["params"] >= 1e9 else f"{r['params'] / 1e6:.3g}M"
    lines = [f"{r['model']} ({size} params, {r['dtype']} compute, {r['param_dtype']} master) on "
             f"{r['topology']}: {r['devices']} x {r['device_kind']}, mesh {r['mesh']}",
             f"  batch {r['batch_size']} x {r['seq_len']} tokens, grad_accum {r['grad_accum']}, remat {r['remat']}; "
             f"step compiled in {r['compile_s']:.1f}s"]
    if r["status"] == "compiler OOM":
        lines.append(f"  the TPU compiler refused it: the program needs {g(r['hbm_bytes'])} per device, "
                     f"{g(r['compiler_available_bytes'])} available (train state ~{g(r['state_bytes_per_device'])}"
                     f"/device) -> DOES NOT FIT")
    else:
        lines.append(f"  per-device HBM {g(r['hbm_bytes'])} = arguments {g(r['argument_bytes'])} + outputs "
                     f"{g(r['output_bytes'])} + temporaries {g(r['temp_bytes'])} - aliased {g(r['alias_bytes'])} "
                     f"(train state {g(r['state_bytes_per_device'])}/device)")
        if r["capacity_bytes"]:
            verdict = "FITS" if r["fits"] else "DOES NOT FIT"
            lines.append(f"  capacity {r['capacity_bytes'] / GIB:.2f} GiB/device -> {verdict} "
                         f"({100 * r['hbm_bytes'] / r['capacity_bytes']:.0f}% used)")
        else:
            lines.append("  capacity unknown for this device: no verdict")
    if r["fits"] is False and r["remat"] != "full":
        lines.append("  (try --remat full, a larger slice, or a smaller batch)")
    if r.get("dcn_transfers") is not None:
        sent = ", ".join(f"{k.lower().replace('_', '-')} x{v['count']} ({v['bytes'] / 2**20:.2f} MiB)"
                         for k, v in sorted(r["dcn_transfers"].items()))
        lines.append(f"  between slices (DCN), per device, each op of the program once (a scanned layer's once): "
                     f"{sent or 'nothing'}")
    elif r.get("dcn_note"):
        lines.append(f"  between slices (DCN): not read, XLA could not print the compiled program ({r['dcn_note']})")
    xla = f"; XLA's cost analysis counts {r['xla_flops_per_device'] / 1e12:.4g} TFLOP (each loop body once)" \
        if r.get("xla_flops_per_device") else ""
    lines.append(f"  FLOPs per step per device {r['flops_per_device'] / 1e12:.4g} TFLOP analytic{xla}")
    if r["step_s_at_peak"]:
        tps = r["batch_size"] * r["seq_len"] / r["step_s_at_peak"]
        lines.append(f"  at 100% of {r['peak_flops_per_device'] / 1e12:.0f} TFLOP/s/device: step "
                     f"{r['step_s_at_peak']:.3g}s, {tps:,.0f} tokens/s (at 50% MFU: twice the time)")
    return "\n".join(lines)


def compile_only(args: TrainConfig) -> dict | int:
    """train.py --compile-only: plans the run train.py's flags describe (exit status 2 on bad flags)."""
    try:
        cfg = load_model_config(args.model, args.model_overrides())
        if args.vocab_size is not None:
            if not str(args.vocab_size).isdigit() or int(args.vocab_size) <= 0:
                raise PlanError("--compile-only takes a numeric --vocab-size (no tokenizer is loaded)")
            cfg = cfg.replace(vocab_size=int(args.vocab_size))
        opt, args = args.optim(), args.with_model_objective(cfg)
        result = plan(cfg, args.topology, mesh=args.mesh, batch_size=args.batch_size, seq_len=args.seq_len,
                      objective=args.objective, grad_accum=args.grad_accum, z_loss=args.z_loss, opt=opt)
    except (UsageError, PlanError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    print(format_plan(result))
    return result
