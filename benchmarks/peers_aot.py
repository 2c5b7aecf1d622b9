"""`python -m benchmarks.peers --tpu-aot`: our train step and MaxText's, compiled ahead of time for the
same TPU slices on this CPU host (libtpu describes the topology; no TPU is needed), side by side.

Each case is one model on one slice at one sequence length (CASES). Both sides compile the same step:
the model's pretraining loss, backward, global-norm clipping and AdamW (b1 0.9, b2 0.95, eps 1e-8,
weight decay 0.1, clip 1.0: MaxText's base.yml defaults, which are also our OptimConfig's, and
both sides are passed them explicitly), float32 master weights and moments, bfloat16 compute,
`remat full` (MaxText's remat_policy=full), the batch sharded over every chip (ours --mesh fsdp=-1,
MaxText's default ici_fsdp_parallelism=-1), the same global batch (MaxText: per_device_batch_size
= batch / devices). Each side's own defaults are kept otherwise (attention: each one's Pallas flash
kernel; the loss: ours blockwise over the vocabulary, MaxText's over the whole logits).

Per side and case, figures per device (one device per chip on v5p and v6e):

  memory    XLA's memory_analysis of the full-depth step as each side runs it (layers scanned):
            arguments, temporaries, peak, and arguments + outputs + temporaries - aliased (donated
            state), the figure compared with the chip's HBM ("fits")
  FLOPs     XLA's cost_analysis, whose `flops` and roofline `optimal_seconds` count the body of a
            loop once: a scanned stack of L layers counts as one layer. So both are EXTRAPOLATED to
            the whole step from two compiles with the layers unrolled, 1 and 2 layers:
            f(L) = f(1) + (L - 1) * (f(2) - f(1)). MaxText unrolls with scan_layers=false; ours has
            no unrolled option, so the layer scan is built with unroll=True for these two compiles (a
            patch local to this benchmark: the same layers, no loop), and the loss takes the whole
            vocabulary in one block (loss_vocab_block = vocab size: the same blockwise loss, one trip
            of its loop, so every block is counted). A Pallas kernel is counted through the cost
            estimate it carries: ours carries one; MaxText's default TPU attention (jax's splash
            kernel) carries none, so XLA counts its attention as 0 FLOPs and 0 s. Its FLOP compiles
            therefore use MaxText's other splash kernel, tokamax's (use_tokamax_splash=true), whose
            estimate follows the same FlashAttention convention as ours (forward 4*T*S*H per head,
            backward 10*T*S*H, times the causal mask's density); the default kernel's figures (its
            attention uncounted) are kept in the JSON as *_uncosted_attention
  max batch a doubling search over the global batch from the case's (halving when that does not
            fit), stopping at the first that does not fit, at most --max-doublings steps: the largest
            that compiled and fits; ">=" when the search stopped on one that still fits

MaxText runs under its own interpreter (--maxtext-python) through a small driver that calls its
train_compile.main and reads the compiled step it builds. Both sides use libtpu's compiler (each
venv's libtpu; the versions are saved). Results: results/peers_tpu_aot.{json,md} (--small:
peers_tpu_aot_small.*), with both sides' versions and the date.

    python -m benchmarks.peers --tpu-aot                              # the three cases, ~1-2 h on 2 cores
    python -m benchmarks.peers --tpu-aot --cases 8b-v5p --max-doublings 2
    python -m benchmarks.peers --tpu-aot --small                      # tiny-llama on v5p-8, minutes
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import jax

from benchmarks.common import RESULTS_DIR, markdown_table, write_json

GIB = 1024**3
MARK = "PEER_AOT_RESULT "

# The optimizer both sides compile, as MaxText's base.yml keys; ours is OptimConfig with the same values.
MAXTEXT_OPTIMIZER = {"opt_type": "adamw", "adam_b1": 0.9, "adam_b2": 0.95, "adam_eps": 1e-8,
                     "adam_weight_decay": 0.1, "gradient_clipping_threshold": 1.0}
OPTIMIZER_TEXT = ("AdamW b1=0.9 b2=0.95 eps=1e-8 weight_decay=0.1, global-norm clip 1.0, float32 master weights "
                  "and moments, bfloat16 compute (MaxText's base.yml defaults = our OptimConfig defaults, both "
                  "passed explicitly)")
EXTRAPOLATION_TEXT = ("FLOPs and optimal_seconds are per device for the WHOLE step, extrapolated as "
                      "f(1) + (L-1) * (f(2) - f(1)) from compiles with 1 and 2 unrolled layers (XLA's cost "
                      "analysis counts a scanned layer stack's body once); memory is the full-depth scanned step's. "
                      "Attention kernels count through their cost estimates: MaxText's FLOP compiles use its "
                      "tokamax splash kernel (use_tokamax_splash=true), as its default jax splash kernel has no "
                      "estimate (XLA would count its attention as 0)")


@dataclasses.dataclass(frozen=True)
class Case:
    """One model on one slice: our preset and the MaxText config of the same model."""

    name: str
    model: str                 # zoo preset
    topology: str              # Cloud slice name (both sides)
    batch: int                 # global batch, rows
    seq_len: int
    maxtext: tuple = ()        # MaxText keys describing the model (model_name=..., or its dimensions)
    overrides: tuple = ()      # our config overrides (field, value)


CASES = {
    "8b-v5p": Case("8b-v5p", "llama3.1-8b", "v5p-8", 8, 8192, ("model_name=llama3.1-8b",)),
    "8b-v6e": Case("8b-v6e", "llama3.1-8b", "v6e-8", 8, 8192, ("model_name=llama3.1-8b",)),
    "70b-v5p": Case("70b-v5p", "llama3.1-70b", "v5p-128", 64, 4096, ("model_name=llama3.1-70b",)),
}
# --small: tiny-llama (bfloat16 compute, as the real cases) against MaxText's default model at its dimensions
SMALL = Case("tiny-v5p", "tiny-llama", "v5p-8", 8, 128,
             ("model_name=default", "base_emb_dim=64", "base_num_query_heads=4", "base_num_kv_heads=2",
              "base_mlp_dim=128", "head_dim=16", "vocab_size=512", "decoder_block=llama2",
              "mlp_activations=[silu,linear]", "logits_via_embedding=false", "enable_dropout=false"),
             (("dtype", "bfloat16"),))
SIDES = ("zoo", "maxtext")


def extrapolate(f1: float | None, f2: float | None, layers: int) -> float | None:
    """The whole step's figure from 1- and 2-layer compiles: f(1) + (layers - 1) * (f(2) - f(1))."""
    if f1 is None or f2 is None:
        return None
    return f1 + (layers - 1) * (f2 - f1)


def _num_layers(case: Case) -> int:
    import zoo

    return zoo.config(case.model).num_layers


# --------------------------------------------------------------------------------------------- our side


@contextlib.contextmanager
def unrolled_layer_scan():
    """Builds zoo's layer scans with unroll=True inside the block: the same layers, no loop, so that
    XLA's cost analysis counts every layer. Yields a list that records each scan built."""
    import flax.linen as linen

    import zoo.nn.scan as scan_module

    if getattr(scan_module, "nn", None) is not linen:
        raise RuntimeError("zoo.nn.scan no longer builds its scan through `flax.linen as nn`: update "
                           "benchmarks.peers_aot.unrolled_layer_scan")
    built = []

    class _Linen:
        def __getattr__(self, name):
            return getattr(linen, name)

        @staticmethod
        def scan(*args, **kwargs):
            built.append(kwargs.get("length"))
            return linen.scan(*args, **dict(kwargs, unroll=True))

    scan_module.nn = _Linen()
    try:
        yield built
    finally:
        scan_module.nn = linen


def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
    return {"flops": cost.get("flops"), "optimal_seconds": cost.get("optimal_seconds"),
            "bytes_accessed": cost.get("bytes accessed")}


def _memory(mem) -> dict:
    """Per-device figures of a CompiledMemoryStats (or of the dict the MaxText driver prints)."""
    get = (lambda k: mem.get(k)) if isinstance(mem, dict) else (lambda k: getattr(mem, k, None))
    out = {"argument_bytes": get("argument_size_in_bytes"), "output_bytes": get("output_size_in_bytes"),
           "temp_bytes": get("temp_size_in_bytes"), "alias_bytes": get("alias_size_in_bytes"),
           "peak_bytes": get("peak_memory_in_bytes")}
    out["hbm_bytes"] = out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"] - out["alias_bytes"]
    return out


def zoo_compile(case: Case, *, batch: int, layers: int | None = None, unrolled: bool = False,
                costed_attention: bool = True) -> dict:
    """Compiles our train step (zoo.training.step.make_trainer, as train.py runs it) for the case's slice.

    layers=None: the preset's depth, scanned (the memory figures); `unrolled` builds the layer scan
    unrolled and the loss in one vocabulary block (the FLOP compiles). Our attention kernel always
    carries its cost estimate (`costed_attention` is MaxText's switch)."""
    del costed_attention
    import zoo
    from zoo.configs import with_overrides
    from zoo.sharding import make_mesh
    from zoo.training.optimizer import OptimConfig
    from zoo.training.plan import _compiler_oom, topology_devices
    from zoo.training.step import make_trainer

    opt = OptimConfig()
    mine = {"adam_b1": opt.b1, "adam_b2": opt.b2, "adam_eps": opt.eps, "adam_weight_decay": opt.weight_decay,
            "gradient_clipping_threshold": opt.clip_norm}
    if any(mine[k] != MAXTEXT_OPTIMIZER[k] for k in mine):
        raise RuntimeError(f"OptimConfig's defaults {mine} are no longer MaxText's {MAXTEXT_OPTIMIZER}")
    cfg = with_overrides(zoo.config(case.model, remat="full"), dict(case.overrides))
    if layers is not None:
        cfg = cfg.replace(num_layers=layers)
    if unrolled:
        cfg = cfg.replace(loss_vocab_block=cfg.vocab_size)
    mesh = make_mesh("fsdp=-1", devices=list(topology_devices(case.topology)))
    t0 = time.perf_counter()
    try:
        with unrolled_layer_scan() if unrolled else contextlib.nullcontext([None]) as built:
            trainer = make_trainer(cfg, mesh, opt, batch_size=batch, seq_len=case.seq_len)
        if not built:
            raise RuntimeError(f"{case.model}: no layer scan was built through zoo.nn.scan; cannot unroll")
    except jax.errors.JaxRuntimeError as e:
        oom = _compiler_oom(str(e))
        if oom is None:
            return {"status": "failed", "compile_s": time.perf_counter() - t0, "message": str(e)[:500]}
        return {"status": "compiler OOM", "compile_s": time.perf_counter() - t0, "hbm_bytes": oom["required"],
                "message": oom["message"]}
    result = {"status": "compiled", "compile_s": time.perf_counter() - t0, **_memory(trainer.step.memory_analysis()),
              **_cost(trainer.step)}
    del trainer
    jax.clear_caches()
    gc.collect()
    return result


# ----------------------------------------------------------------------------------------- MaxText's side

# Run by MaxText's interpreter: its own train_compile.main, with jit_and_compile wrapped to keep the
# compiled step, whose memory and cost analyses are printed as one JSON line.
DRIVER = r"""
import json, sys, time, traceback
from maxtext.trainers.pre_train import train_compile

kept = {}
compile_step = train_compile.jit_and_compile

def keep(*args, **kwargs):
    t0 = time.perf_counter()
    kept["compiled"] = compile_step(*args, **kwargs)
    kept["compile_s"] = time.perf_counter() - t0
    return kept["compiled"]

train_compile.jit_and_compile = keep
out = {}
try:
    train_compile.main(["train_compile"] + sys.argv[1:])
    compiled = kept["compiled"]
    mem = compiled.memory_analysis()
    out["memory"] = {k: getattr(mem, k, None) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                     "temp_size_in_bytes", "alias_size_in_bytes", "peak_memory_in_bytes")}
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
    out["cost"] = {k: cost.get(k) for k in ("flops", "optimal_seconds", "bytes accessed")}
    out["compile_s"] = kept["compile_s"]
    out["status"] = "compiled"
except BaseException as e:
    out = {"status": "error", "message": "".join(traceback.format_exception_only(type(e), e))[-4000:]}
print(MARK + json.dumps(out), flush=True)
""".replace("MARK", repr(MARK))


def maxtext_args(case: Case, *, batch: int, devices: int, out_dir: str, layers: int | None = None,
                 unrolled: bool = False, costed_attention: bool = True) -> list[str]:
    """The base.yml overrides of MaxText's compile of one case (layers / unrolled as zoo_compile's; an
    unrolled compile with `costed_attention` takes the tokamax splash kernel, which has a cost estimate)."""
    args = [f"run_name=zoo-aot-{case.name}", f"base_output_directory={out_dir}", f"compile_topology={case.topology}",
            "compile_topology_num_slices=1", *case.maxtext, f"per_device_batch_size={batch / devices:g}",
            f"max_target_length={case.seq_len}", "remat_policy=full", "dtype=bfloat16", "weight_dtype=float32",
            "dataset_type=synthetic", "enable_checkpointing=false", "skip_jax_distributed_system=true",
            *(f"{k}={v}" for k, v in MAXTEXT_OPTIMIZER.items())]
    if layers is not None:
        args += ["override_model_config=true", f"base_num_decoder_layers={layers}"]
    if unrolled:
        args.append("scan_layers=false")
        if costed_attention:
            args.append("use_tokamax_splash=true")
    return args


def maxtext_env() -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if "force_host_platform_device_count" not in f)
    env.pop("PYTHONPATH", None)
    return env


def maxtext_compile(case: Case, *, python: str, base_yml: str, tmp: str, batch: int, devices: int,
                    layers: int | None = None, unrolled: bool = False, costed_attention: bool = True) -> dict:
    """Compiles MaxText's train step (its train_compile) for the case's slice in MaxText's interpreter."""
    from zoo.training.plan import _compiler_oom

    log = Path(tmp, f"maxtext-{case.name}-b{batch}-l{layers}-{'u' if unrolled else 's'}{int(costed_attention)}.log")
    cmd = [python, "-c", DRIVER, base_yml, *maxtext_args(case, batch=batch, devices=devices, out_dir=tmp,
                                                         layers=layers, unrolled=unrolled,
                                                         costed_attention=costed_attention)]
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=maxtext_env(), cwd=tmp).returncode
    wall = time.perf_counter() - t0
    line = next((ln for ln in reversed(log.read_text().splitlines()) if ln.startswith(MARK)), None)
    if line is None:
        tail = log.read_text()[-600:].replace("\n", " | ")
        return {"status": "failed", "compile_s": wall, "wall_s": wall, "message": f"exit {rc}; log: {tail}"}
    out = json.loads(line[len(MARK):])
    if out["status"] != "compiled":
        oom = _compiler_oom(out["message"])
        if oom is None:
            return {"status": "failed", "compile_s": wall, "wall_s": wall, "message": out["message"][-600:]}
        return {"status": "compiler OOM", "compile_s": wall, "wall_s": wall, "hbm_bytes": oom["required"],
                "message": oom["message"]}
    cost = out["cost"]
    return {"status": "compiled", "compile_s": out["compile_s"], "wall_s": wall, **_memory(out["memory"]),
            "flops": cost["flops"], "optimal_seconds": cost["optimal_seconds"],
            "bytes_accessed": cost["bytes accessed"]}


# ------------------------------------------------------------------------------------------- one side


def _gib(b) -> str:
    return "-" if b is None else f"{b / GIB:.2f} GiB"


def measure_side(compile_fn, case: Case, *, layers: int, devices: int, capacity: int, max_doublings: int,
                 uncosted: bool = False, say=print) -> dict:
    """One side on one case: the full-depth step (memory), the 1- and 2-layer unrolled steps (whole-step
    FLOPs and optimal_seconds, extrapolated), and the batch search. `compile_fn(batch=, layers=, unrolled=,
    costed_attention=)`; `uncosted`: also the 1- and 2-layer steps with the side's default attention kernel
    where that one has no cost estimate (MaxText's)."""
    shards = devices  # the batch is split over every device (fsdp=-1)

    def run(what, **kw):
        say(f"  compiling {what} ...")
        r = compile_fn(**kw)
        r["fits"] = r["status"] == "compiled" and r["hbm_bytes"] <= capacity
        shown = f"{_gib(r.get('hbm_bytes'))}/device, {'fits' if r['fits'] else 'DOES NOT FIT'}" \
            if r["status"] != "failed" else f"FAILED: {r['message'][:300]}"
        say(f"  {what}: {r['status']} in {r['compile_s']:.0f}s, {shown}")
        return r

    full = run(f"full depth ({layers} layers, scanned), batch {case.batch}", batch=case.batch)
    one = run(f"1 layer unrolled, batch {case.batch}", batch=case.batch, layers=1, unrolled=True)
    two = run(f"2 layers unrolled, batch {case.batch}", batch=case.batch, layers=2, unrolled=True)
    flops = extrapolate(one.get("flops"), two.get("flops"), layers)
    seconds = extrapolate(one.get("optimal_seconds"), two.get("optimal_seconds"), layers)
    raw = {}
    if uncosted:
        raw1 = run(f"1 layer unrolled, default attention kernel (no cost estimate), batch {case.batch}",
                   batch=case.batch, layers=1, unrolled=True, costed_attention=False)
        raw2 = run(f"2 layers unrolled, default attention kernel (no cost estimate), batch {case.batch}",
                   batch=case.batch, layers=2, unrolled=True, costed_attention=False)
        raw = {"one_layer_uncosted_attention": raw1, "two_layers_uncosted_attention": raw2,
               "flops_per_device_uncosted_attention": extrapolate(raw1.get("flops"), raw2.get("flops"), layers),
               "optimal_seconds_uncosted_attention": extrapolate(raw1.get("optimal_seconds"),
                                                                 raw2.get("optimal_seconds"), layers)}
    tried = [(case.batch, full)]
    if full["status"] != "failed":
        grow = full["fits"]
        batch = case.batch
        for _ in range(max_doublings):
            batch = 2 * batch if grow else batch // 2
            if batch < shards or batch % shards:
                break
            r = run(f"full depth, batch {batch} (batch search)", batch=batch)
            tried.append((batch, r))
            if r["fits"] != grow or r["status"] == "failed":
                break
    fitting = [b for b, r in tried if r["fits"]]
    failing = [b for b, r in tried if not r["fits"]]
    max_batch = max(fitting) if fitting else None
    return {"status": full["status"], "batch": case.batch, "full": full, "one_layer": one, "two_layers": two,
            "flops_per_device": flops, "optimal_seconds": seconds, "layers": layers,
            "search": [{"batch": b, "status": r["status"], "fits": r["fits"], "hbm_bytes": r.get("hbm_bytes"),
                        "compile_s": r["compile_s"]} for b, r in tried],
            "max_batch": max_batch,
            "max_batch_is_lower_bound": bool(fitting) and not any(b > max_batch for b in failing),
            "compile_s_total": sum(r["compile_s"] for r in (full, one, two, *[r for _, r in tried[1:]]))
            + sum(r["compile_s"] for k, r in raw.items() if k.startswith(("one", "two"))), **raw}


# -------------------------------------------------------------------------------------------- the table

RATIO_FIELDS = ("argument_gib", "temp_gib", "peak_gib", "hbm_gib", "tflop_per_device", "optimal_s", "max_batch")
COLUMNS = ["case", "side", "batch", "argument_gib", "temp_gib", "peak_gib", "hbm_gib", "fits", "tflop_per_device",
           "optimal_s", "max_batch", "compile_s"]


def side_row(case: Case, side: str, m: dict) -> dict:
    """One table row: a side's figures in GiB / TFLOP / s."""
    full = m["full"]
    g = lambda k: None if full.get(k) is None else full[k] / GIB  # noqa: E731
    return {"case": case.name, "side": side, "batch": case.batch, "argument_gib": g("argument_bytes"),
            "temp_gib": g("temp_bytes"), "peak_gib": g("peak_bytes"), "hbm_gib": g("hbm_bytes"),
            "fits": "yes" if full["fits"] else ("**no**" if full["status"] != "failed" else "failed"),
            "tflop_per_device": None if m["flops_per_device"] is None else m["flops_per_device"] / 1e12,
            "optimal_s": m["optimal_seconds"], "max_batch": m["max_batch"],
            "max_batch_text": "-" if m["max_batch"] is None else
            (">=" if m["max_batch_is_lower_bound"] else "") + str(m["max_batch"]),
            "compile_s": full["compile_s"]}


def ratio_row(ours: dict, theirs: dict) -> dict:
    """ours / maxtext for every figure both have."""
    row = {"case": ours["case"], "side": "zoo/maxtext", "batch": ours["batch"]}
    for k in RATIO_FIELDS:
        a, b = ours.get(k), theirs.get(k)
        row[k] = a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None
    return row


def _fmt_row(r: dict) -> dict:
    out = dict(r)
    ratio = r["side"] == "zoo/maxtext"
    for k in RATIO_FIELDS + ("compile_s",):
        v = r.get(k)
        if v is None:
            out[k] = "-"
        elif ratio:
            out[k] = f"{v:.3f}x"
        elif k == "max_batch":
            out[k] = r.get("max_batch_text", str(v))
        elif k == "optimal_s":
            out[k] = f"{v:.4g}"
        elif k == "compile_s":
            out[k] = f"{v:.0f}"
        else:
            out[k] = f"{v:.2f}" if k.endswith("gib") else f"{v:.4g}"
    if ratio:
        out["fits"] = ""
    return out


def markdown(payload: dict) -> str:
    """The results table with the versions, the date and how the figures were made."""
    rows = [_fmt_row(r) for case in payload["cases"] for r in case["rows"]]
    notes = [f"Measured {payload['date']} on this CPU host (AOT, libtpu): ours jax {payload['zoo']['jax']} "
             f"(libtpu {payload['zoo']['libtpu']}); MaxText {payload['maxtext'].get('maxtext') or 'not run'} "
             f"with jax {payload['maxtext'].get('jax') or '-'} (libtpu {payload['maxtext'].get('libtpu') or '-'}).",
             "Per device (one device per chip on v5p and v6e). argument/temp/peak: XLA's memory_analysis; hbm = "
             "arguments + outputs + temporaries - aliased, compared with the chip's HBM (fits).",
             EXTRAPOLATION_TEXT + ". optimal_s is XLA's roofline `optimal_seconds`.",
             f"Optimizer: {OPTIMIZER_TEXT}; remat full on both sides.",
             "max_batch: the largest global batch that compiled and fits in a doubling search from `batch` "
             "(>=: the search stopped while it still fit)."]
    for case in payload["cases"]:
        mt = case["sides"].get("maxtext", {})
        if mt.get("flops_per_device_uncosted_attention"):
            notes.append(f"{case['case']}: MaxText with its default attention kernel in the FLOP compiles (jax's "
                         f"splash: no cost estimate, attention counted as 0): "
                         f"{mt['flops_per_device_uncosted_attention'] / 1e12:.4g} TFLOP/device, "
                         f"optimal_seconds {mt['optimal_seconds_uncosted_attention']:.4g}.")
        for side, m in case["sides"].items():
            if m.get("status") not in ("compiled", "compiler OOM"):
                notes.append(f"{case['case']} {side}: {m.get('status')}: {m.get('reason') or m['full'].get('message')}")
    return markdown_table(rows, COLUMNS) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def _libtpu() -> str | None:
    try:
        return version("libtpu")
    except PackageNotFoundError:
        return None


def _maxtext_versions(python: str) -> dict:
    code = ("import importlib.metadata as m, json, jax; print(json.dumps({'maxtext': m.version('maxtext'), "
            "'jax': jax.__version__, 'libtpu': m.version('libtpu')}))")
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, env=maxtext_env())
    try:
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {}


def write_results(payload: dict, out_dir, name: str) -> Path:
    """results/<name>.json (everything) and .md (the table and its notes)."""
    path = write_json(name, payload, out_dir)
    path.with_suffix(".md").write_text(markdown(payload))
    return path


def _saved_cases(out_dir, name: str) -> list[dict]:
    path = Path(out_dir or RESULTS_DIR, f"{name}.json")
    if not path.exists():
        return []
    try:
        return json.loads(path.read_text()).get("cases", [])
    except json.JSONDecodeError:
        return []


# ---------------------------------------------------------------------------------------------- the run


def run(args) -> dict:
    """--tpu-aot: every chosen case on every chosen side; prints and writes the table after each case."""
    from benchmarks.peers import _maxtext_base_yml
    from zoo.training.plan import canonical_topology, chip_info

    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    cases = [SMALL] if args.small else [CASES[c] for c in args.cases]
    sides = [s for s in SIDES if s in args.frameworks]
    name = "peers_tpu_aot_small" if args.small else "peers_tpu_aot"
    python = args.maxtext_python
    maxtext_ok = "maxtext" in sides and bool(python) and os.path.exists(python)
    payload = {"date": datetime.date.today().isoformat(), "optimizer": OPTIMIZER_TEXT, "remat": "full",
               "extrapolation": EXTRAPOLATION_TEXT, "zoo": {"jax": jax.__version__, "libtpu": _libtpu()},
               "maxtext": _maxtext_versions(python) if maxtext_ok else {}, "cases": []}
    order = list(CASES)
    kept = [c for c in _saved_cases(args.out, name) if c["case"] not in {c.name for c in cases}]
    say = functools.partial(print, flush=True)
    with tempfile.TemporaryDirectory(prefix="peers-aot-") as tmp:
        base_yml = _maxtext_base_yml(python) if maxtext_ok else None
        for case in cases:
            info = chip_info(case.topology)
            layers = _num_layers(case)
            entry = {"case": case.name, "model": case.model, "topology": case.topology,
                     "libtpu_topology": canonical_topology(case.topology), "devices": info["devices"],
                     "chips": info["chips"], "hbm_bytes_per_device": info["hbm_bytes_per_device"],
                     "batch": case.batch, "seq_len": case.seq_len, "layers": layers, "sides": {}, "rows": []}
            for side in sides:
                say(f"[{case.name}] {side}: {case.model} on {case.topology} ({info['devices']} devices), "
                    f"batch {case.batch} x {case.seq_len}, remat full")
                if side == "maxtext" and not maxtext_ok:
                    entry["sides"][side] = {"status": "not installed", "reason": f"no MaxText interpreter at {python!r}"
                                            "; see `python -m benchmarks.peers --help`", "full": {}}
                    say(f"  {entry['sides'][side]['reason']}")
                    continue
                if side == "zoo":
                    fn = functools.partial(zoo_compile, case)
                else:
                    fn = functools.partial(maxtext_compile, case, python=python, base_yml=base_yml, tmp=tmp,
                                           devices=info["devices"])
                m = measure_side(fn, case, layers=layers, devices=info["devices"],
                                 capacity=info["hbm_bytes_per_device"], max_doublings=args.max_doublings,
                                 uncosted=side == "maxtext",
                                 say=lambda s, side=side: say(f"[{case.name}] {side}{s}"))
                entry["sides"][side] = m
                entry["rows"].append(side_row(case, side, m))
            rows = {r["side"]: r for r in entry["rows"]}
            if "zoo" in rows and "maxtext" in rows:
                entry["rows"].append(ratio_row(rows["zoo"], rows["maxtext"]))
            payload["cases"].append(entry)
            done = payload["cases"] + kept
            payload_out = dict(payload, cases=sorted(done, key=lambda c: order.index(c["case"])
                                                     if c["case"] in order else -1))
            path = write_results(payload_out, args.out, name)
    print(markdown(payload_out))
    print(f"wrote {path} and {path.with_suffix('.md')}")
    return payload_out


def main(argv=None):
    from benchmarks.peers import build_parser

    return run(build_parser().parse_args(["--tpu-aot", *(argv or [])]))


if __name__ == "__main__":
    main(sys.argv[1:])
