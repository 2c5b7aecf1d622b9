"""Attention kernel benchmark: our kernels against the peers users compare them with, in one
process, on one table: forward or forward+backward, causal or not, over a list of shapes.

Implementations (--impls; every one gets a row per shape, "n/a: <reason>" where it cannot
run on this backend or is not installed, never silently dropped):
  ours    pallas         kernels.attention(implementation="pallas"): Mosaic TPU on TPU, our Mosaic
                         GPU kernel on CUDA sm90+, interpret mode on CPU (labelled "(interpret)")
          pallas_triton  kernels.attention(implementation="pallas_triton"): our Triton kernel (GPU)
          xla            kernels.attention(implementation="xla"): the float32 reference
  peers   cudnn          jax.nn.dot_product_attention(implementation="cudnn") (CUDA)
          jax_nn_xla     jax.nn.dot_product_attention(implementation="xla")
          splash         jax's splash attention (jax.experimental.pallas.ops.tpu.splash_attention; TPU)
          mgpu           jax's Mosaic GPU attention op (jax.experimental.pallas.ops.gpu.attention_mgpu;
                         CUDA sm90+, bf16/fp16; its backward has no causal mask)
          jax_pallas     jax's older Pallas flash attention ops (TPU flash_attention, GPU Triton mha)
          tokamax_*      tokamax.dot_product_attention(implementation=mosaic|triton|cudnn|xla), where
                         tokamax is installed (pip install tokamax)

FLOP convention (FlashAttention's): forward = 4*B*N*T*S*H (QK^T and PV), halved when causal;
backward = 2.5x forward, so fwd+bwd = 3.5x forward. TFLOP/s = FLOPs / median time.
"% peak" divides by the device's dense bf16 peak from a table (H100/H200 989, A100 312,
TPU v5e 197, v5p 459, v6e 918 TFLOP/s; zoo.training.metrics.PEAK_FLOPS); CPU has no such
figure. "% matmul" divides by a dense matmul measured here in the same dtype.

    python -m benchmarks.attention                       # sizes picked for the backend
    python -m benchmarks.attention --shapes 2x8192x16x128 32x4096x32x128x8 --mode fwd --causal on
    python -m benchmarks.attention --seq-lens 1024 4096 --head-dims 128 --modes fwd fwd+bwd

Shapes are "BxTxNxH" or "BxTxNxHxK" (batch, length, query heads, head dim, kv heads; K
defaults to N). With --time-budget, shapes not started in time are rows "n/a: skipped".
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import subprocess
import sys
import time

import jax
import jax.numpy as jnp

import kernels
from benchmarks.common import RESULTS_DIR, device_info, markdown_table, matmul_peak_tflops, time_fn, write_json
from zoo.argtypes import non_negative_float, non_negative_int, positive_int
from zoo.training.metrics import PEAK_FLOPS

# Optional peers: a module missing from the installed jax (or tokamax not installed) becomes
# an "n/a" row with the import error, never an import failure of this benchmark.
_MISSING = {}


def _optional(module: str, key: str, hint: str = "{error}"):
    """The module, or None with `_MISSING[key]` saying why (hint formatted with the error)."""
    try:
        return importlib.import_module(module)
    except Exception as e:  # pragma: no cover - depends on what is installed
        _MISSING[key] = hint.format(error=f"{type(e).__name__}: {e}", kind=type(e).__name__)
        return None


splash = _optional("jax.experimental.pallas.ops.tpu.splash_attention", "splash")
mgpu = _optional("jax.experimental.pallas.ops.gpu.attention_mgpu", "mgpu")
jax_tpu_flash = _optional("jax.experimental.pallas.ops.tpu.flash_attention", "jax_pallas_tpu")
jax_gpu_flash = _optional("jax.experimental.pallas.ops.gpu.attention", "jax_pallas_gpu")  # Triton: leaving jax
tokamax = _optional("tokamax", "tokamax", "tokamax is not installed ({kind}); pip install tokamax")

OURS = ("pallas", "pallas_triton", "xla")
TOKAMAX = ("tokamax_mosaic", "tokamax_triton", "tokamax_cudnn", "tokamax_xla")
PEERS = ("cudnn", "jax_nn_xla", "splash", "mgpu", "jax_pallas") + TOKAMAX
IMPLEMENTATIONS = OURS + PEERS


def attention_flops(b, t, s, n, h, causal, mode):
    """FLOPs of one call, FlashAttention's convention: 4*B*N*T*S*H forward (x0.5 causal), fwd+bwd 3.5x that."""
    fwd = 4.0 * b * t * s * n * h * (0.5 if causal else 1.0)
    return fwd * (3.5 if mode == "fwd+bwd" else 1.0)


def device_peak_tflops(kind: str):
    """(dense bf16 peak TFLOP/s, table entry) for a device kind, or (None, why not)."""
    for name, flops in PEAK_FLOPS:
        if name.lower() in kind.lower():
            return flops / 1e12, f"{name} dense bf16"
    return None, f"no peak figure for {kind!r}"


def parse_shape(text: str) -> tuple[int, int, int, int, int]:
    """"BxTxNxH[xK]" -> (B, T, N, H, K); K (kv heads) defaults to N and must divide it."""
    parts = text.lower().replace(" ", "").split("x")
    try:
        dims = [int(p) for p in parts]
    except ValueError:
        dims = []
    if len(dims) not in (4, 5) or min(dims) <= 0:
        raise argparse.ArgumentTypeError(f"expected BxTxNxH or BxTxNxHxK of positive integers, got {text!r}")
    b, t, n, h = dims[:4]
    k = dims[4] if len(dims) == 5 else n
    if n % k:
        raise argparse.ArgumentTypeError(f"kv heads K={k} must divide query heads N={n} in {text!r}")
    return b, t, n, h, k


def shape_label(b, t, n, h, k) -> str:
    return f"{b}x{t}x{n}x{h}" + (f"x{k}" if k != n else "")


def _gpu_capability():
    """(major, minor) compute capability of the first GPU, or None."""
    cc = getattr(jax.devices()[0], "compute_capability", None)
    try:
        return tuple(int(x) for x in str(cc).split(".")[:2])
    except ValueError:
        return None


def unavailable(impl, platform, dtype, capability=None):
    """Why `impl` cannot run here at all (None if it may run; a call may still fail and say why)."""
    gpu_only = f"runs on CUDA GPUs only (backend {platform})"
    if impl == "pallas_triton" and platform != "gpu":
        return f"our pre-Hopper Triton kernel: benchmarked on GPUs only (backend {platform})"
    if impl in ("cudnn", "tokamax_triton", "tokamax_cudnn") and platform != "gpu":
        return gpu_only
    if impl == "splash":
        return _MISSING.get("splash") or (None if platform == "tpu" else f"a TPU kernel (backend {platform})")
    if impl == "mgpu":
        if mgpu is None:
            return _MISSING["mgpu"]
        if platform != "gpu" or (capability or (0, 0)) < (9, 0):
            where = f"sm{capability[0]}{capability[1]}" if capability else f"backend {platform}"
            return f"a Mosaic GPU kernel for sm90+ ({where})"
        if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
            return f"bf16/fp16 only, not {jnp.dtype(dtype).name}"
    if impl == "jax_pallas":
        if platform not in ("tpu", "gpu"):
            return f"jax ships Pallas flash attention for TPU and GPU only (backend {platform})"
        return _MISSING.get("jax_pallas_" + platform)
    if impl.startswith("tokamax_"):
        if tokamax is None:
            return _MISSING["tokamax"]
        if impl == "tokamax_mosaic" and platform not in ("tpu", "gpu"):
            return f"tokamax's mosaic kernels need a TPU or a CUDA sm90+ GPU (backend {platform})"
    return None


def _splash(q, k, v, causal, interpret=False):
    """jax's splash attention, single device, GQA through its MHA kernel; q pre-scaled (splash does not scale).

    `interpret` runs it in Pallas interpret mode (to check this wrapper on CPU)."""
    b, t, n, h = q.shape
    s = k.shape[1]
    mask = splash.MultiHeadMask([splash.CausalMask((t, s)) if causal else splash.FullMask((t, s))] * n)
    bq, bkv = min(512, t), min(512, s)
    sizes = splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                              block_kv_dkv_compute=bkv, use_fused_bwd_kernel=True)
    kernel = splash.make_splash_mha_single_device(mask, block_sizes=sizes, interpret=interpret)
    out = jax.vmap(kernel)((q * h**-0.5).transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3))
    return out.transpose(0, 2, 1, 3)


def _mgpu(q, k, v, causal, block_kv):
    """jax's Mosaic GPU (FlashAttention-3 style) op; q pre-scaled (the op does not scale)."""
    cfg = mgpu.TuningConfig(block_q=64, block_kv=block_kv, max_concurrent_steps=2, causal=causal,
                            block_q_dkv=64, block_kv_dkv=64, block_q_dq=64, block_kv_dq=64)
    return mgpu.attention(q * q.shape[-1] ** -0.5, k, v, cfg)


def _jax_pallas(q, k, v, causal):
    """jax's older Pallas flash attention for the backend (TPU or GPU Triton op), [B, T, N, H] layout."""
    scale = q.shape[-1] ** -0.5
    if jax.devices()[0].platform == "tpu":
        out = jax_tpu_flash.flash_attention(q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3),
                                            v.transpose(0, 2, 1, 3), causal=causal, sm_scale=scale)
        return out.transpose(0, 2, 1, 3)
    return jax_gpu_flash.mha(q, k, v, segment_ids=None, causal=causal, sm_scale=scale)


def variants(impl, causal):
    """Forward functions (q, k, v) -> out to try in order; the first that compiles is timed."""
    if impl in OURS:
        return [lambda q, k, v: kernels.attention(q, k, v, causal=causal, implementation=impl)]
    if impl in ("cudnn", "jax_nn_xla"):
        name = "cudnn" if impl == "cudnn" else "xla"
        return [lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=name)]
    if impl == "splash":
        return [lambda q, k, v: _splash(q, k, v, causal)]
    if impl == "mgpu":  # smaller kv blocks when shared memory runs out (large head dims)
        return [lambda q, k, v, bkv=bkv: _mgpu(q, k, v, causal, bkv) for bkv in (128, 64)]
    if impl == "jax_pallas":
        return [lambda q, k, v: _jax_pallas(q, k, v, causal)]
    name = impl.removeprefix("tokamax_")
    return [lambda q, k, v: tokamax.dot_product_attention(q, k, v, is_causal=causal, implementation=name)]


def make_fn(fwd, mode):
    """The jitted call to time: the forward, or the gradient w.r.t. q, k, v of its sum (fwd+bwd)."""
    if mode == "fwd":
        return jax.jit(fwd)

    def loss(q, k, v):
        return jnp.sum(fwd(q, k, v).astype(jnp.float32))

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def _reason(e: Exception) -> str:
    lines = [line for line in str(e).splitlines() if line.strip()] or [""]
    return f"{type(e).__name__}: {lines[0][:200]}"


def label(row) -> str:
    """The implementation's name as shown in tables and plots ("pallas (interpret)" on CPU)."""
    return row["impl"] + (" (interpret)" if row.get("interpret") else "")


def run(shapes, *, dtype, modes, causals, impls, warmup, repeats, peak=None, matmul_peak=None, time_budget=None):
    """Times every implementation on every (shape, causal, mode); returns the rows.

    An implementation that cannot serve a call gets status "n/a" and the reason.
    """
    platform = jax.devices()[0].platform
    capability = _gpu_capability() if platform == "gpu" else None
    start = time.perf_counter()
    rows = []
    for b, t, n, h, kh in shapes:
        for causal in causals:
            for mode in modes:
                kq, kk, kv = jax.random.split(jax.random.key(t * 1000 + h), 3)
                q = jax.random.normal(kq, (b, t, n, h), dtype)
                k = jax.random.normal(kk, (b, t, kh, h), dtype)
                v = jax.random.normal(kv, (b, t, kh, h), dtype)
                flops = attention_flops(b, t, t, n, h, causal, mode)
                for impl in impls:
                    row = dict(impl=impl, shape=shape_label(b, t, n, h, kh), batch=b, seq_len=t, kv_len=t, heads=n,
                               kv_heads=kh, head_dim=h, causal=causal, mode=mode, dtype=jnp.dtype(dtype).name,
                               flops=flops, interpret=(impl == "pallas" and platform == "cpu"))
                    why = unavailable(impl, platform, dtype, capability)
                    if time_budget is not None and time.perf_counter() - start > time_budget:
                        why = f"skipped: --time-budget {time_budget:g} s spent"
                    if why is None:
                        for fwd in variants(impl, causal):
                            try:
                                timing = time_fn(make_fn(fwd, mode), q, k, v, warmup=warmup, repeats=repeats)
                            except Exception as e:  # an implementation that cannot serve this call says why
                                why = why or _reason(e)  # the first variant's error
                            else:
                                why = None
                                break
                    if why is not None:
                        row.update(status="n/a", reason=why)
                    else:
                        tflops = flops / timing["median_s"] / 1e12
                        row.update(status="ok", time_ms=timing["median_s"] * 1e3, tflops=tflops,
                                   pct_peak=100 * tflops / peak if peak else None,
                                   pct_matmul=100 * tflops / matmul_peak if matmul_peak else None)
                    rows.append(row)
                    shown = (f"{row['time_ms']:9.3f} ms {row['tflops']:9.3f} TFLOP/s" if row["status"] == "ok"
                             else f"n/a: {row['reason']}")
                    print(f"{impl:>14} {row['shape']:>18} causal={causal!s:<5} {mode:<7} {shown}", flush=True)
                del q, k, v
    return rows


def table_rows(rows):
    """Rows for the printed/markdown table: every ok row, every n/a row, except that an
    implementation n/a everywhere for one reason shows once (shape "all")."""
    out = []
    for impl in dict.fromkeys(r["impl"] for r in rows):
        mine = [r for r in rows if r["impl"] == impl]
        reasons = {r.get("reason") for r in mine}
        if all(r["status"] == "n/a" for r in mine) and len(reasons) == 1:
            out.append(dict(impl=impl, shape="all", result=f"n/a: {mine[0]['reason']}"))
            continue
        for r in mine:
            out.append(dict(r, impl=label(r), result="ok" if r["status"] == "ok" else f"n/a: {r['reason']}"))
    return out


TABLE_COLUMNS = ["impl", "shape", "causal", "mode", "time_ms", "tflops", "pct_peak", "pct_matmul", "result"]


def plot(rows, path):
    """Grouped bars of TFLOP/s per shape, one panel per (mode, causal), one bar per implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    panels = sorted({(r["mode"], r["causal"]) for r in ok})
    if not panels:
        return None
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    names = list(dict.fromkeys(label(r) for r in ok))
    fig, axes = plt.subplots(1, len(panels), figsize=(max(5.0, 1.2 * len(shapes) + 2) * len(panels), 4.0),
                             squeeze=False)
    width = 0.8 / len(names)
    for ax, (mode, causal) in zip(axes[0], panels):
        for j, name in enumerate(names):
            ys = [next((r["tflops"] for r in ok if (label(r), r["shape"], r["mode"], r["causal"])
                        == (name, s, mode, causal)), 0.0) for s in shapes]
            ax.bar([i + j * width for i in range(len(shapes))], ys, width, label=name)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(shapes))], shapes, rotation=20, fontsize=7)
        ax.set_title(f"{mode}, causal={causal}", fontsize=9)
        ax.set_ylabel("TFLOP/s (FA convention)")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def gpu_driver():
    """`nvidia-smi` name and driver version of the first GPU, or None."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        return None
    return out[0] if out else None


def build_parser(small: bool) -> argparse.ArgumentParser:
    """Flags of `python -m benchmarks.attention` (defaults depend on the backend)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.attention", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", type=parse_shape, nargs="+", default=None,
                   help="shapes BxTxNxH[xK] (batch, length, heads, head dim[, kv heads]); overrides --seq-lens, "
                        "--head-dims, --batch, --heads, --kv-heads")
    p.add_argument("--seq-lens", type=positive_int, nargs="+", default=[128, 256, 512] if small else [1024, 2048, 4096,
                                                                                              8192, 16384],
                   help="sequence lengths (q_len = kv_len)")
    p.add_argument("--head-dims", type=positive_int, nargs="+", default=[64] if small else [64, 128],
                   help="head dimensions H (default: 64 on CPU, 64 128 elsewhere)")
    p.add_argument("--batch", type=positive_int, default=1 if small else 4,
                   help="batch B (default: 1 on CPU, 4 elsewhere)")
    p.add_argument("--heads", type=positive_int, default=4 if small else 16,
                   help="query heads N (default: 4 on CPU, 16 elsewhere)")
    p.add_argument("--kv-heads", type=positive_int, default=None, help="key/value heads K (default: --heads, i.e. MHA)")
    p.add_argument("--dtype", default="float32" if small else "bfloat16", choices=["float32", "bfloat16", "float16"],
                   help="q/k/v dtype; the matmul peak is measured in it too (default: float32 on CPU, else bfloat16)")
    p.add_argument("--modes", "--mode", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"],
                   help="forward only, and/or forward + gradients w.r.t. q, k, v (default: both)")
    p.add_argument("--causal", choices=["both", "true", "false", "on", "off"], default="both",
                   help="causal masking: both, true/on or false/off (default: both)")
    p.add_argument("--impls", nargs="+", default=list(IMPLEMENTATIONS), choices=IMPLEMENTATIONS,
                   help="implementations (default: all; see above; n/a rows say why)")
    p.add_argument("--warmup", type=non_negative_int, default=1 if small else 3,
                   help="untimed calls before timing (default: 1 on CPU, 3 elsewhere)")
    p.add_argument("--repeats", type=positive_int, default=3 if small else 20,
                   help="timed calls; the median is reported (default: 3 on CPU, 20 elsewhere)")
    p.add_argument("--time-budget", type=non_negative_float, default=None,
                   help="seconds after which calls not yet started become 'n/a: skipped' rows (default: none)")
    p.add_argument("--out", default=str(RESULTS_DIR), help="directory for <name>.json/.md/.png")
    p.add_argument("--name", default=None, help="result file stem (default attention_<platform>)")
    return p


def main(argv=None):
    """CLI: runs the sweep, prints the table, writes <name>.json, .png and .md."""
    platform = jax.devices()[0].platform
    args = build_parser(platform == "cpu").parse_args(argv)
    causals = {"both": [False, True], "true": [True], "on": [True], "false": [False], "off": [False]}[args.causal]
    shapes = args.shapes or [(args.batch, t, args.heads, h, args.kv_heads or args.heads)
                             for h in args.head_dims for t in args.seq_lens]
    for _, _, n, _, k in shapes:
        if n % k:
            raise SystemExit(f"--kv-heads {k} must divide --heads {n}")
    dtype = jnp.dtype(args.dtype)
    dev = device_info()
    driver = gpu_driver() if platform == "gpu" else None
    if driver:
        dev["nvidia_smi"] = driver
    peak, peak_source = device_peak_tflops(dev["device_kind"]) if platform != "cpu" else (None, "CPU: no peak figure")
    matmul_peak = matmul_peak_tflops(dtype)
    rows = run(shapes, dtype=dtype, modes=args.modes, causals=causals, impls=args.impls, warmup=args.warmup,
               repeats=args.repeats, peak=peak, matmul_peak=matmul_peak, time_budget=args.time_budget)
    name = args.name or f"attention_{platform}"
    payload = dict(device=dev, peak_tflops=peak, peak_source=peak_source, matmul_peak_tflops=matmul_peak, rows=rows,
                   flops_convention="FlashAttention: fwd 4*B*N*T*S*H (x0.5 causal); fwd+bwd = 3.5x fwd",
                   tokamax_version=getattr(tokamax, "__version__", None))
    path = write_json(name, payload, args.out)
    png = plot(rows, path.with_suffix(".png"))
    table = markdown_table(table_rows(rows), TABLE_COLUMNS)
    peak_text = f"{peak:.4g} TFLOP/s ({peak_source})" if peak else peak_source
    header = (f"{dev['device_kind']}" + (f" ({driver})" if driver else "") + f", jax {dev['jax_version']}, "
              f"{dev['date']}; {args.dtype}; % peak of {peak_text}; % matmul of a measured {args.dtype} matmul "
              f"{matmul_peak:.3g} TFLOP/s; TFLOP/s by the FlashAttention convention (causal counts half, "
              f"fwd+bwd 3.5x fwd)")
    md = path.with_suffix(".md")
    md.write_text(f"{header}\n\n{table}\n")
    print(header)
    print(table)
    print(f"wrote {path}, {md}" + (f" and {png}" if png else ""))
    return payload


if __name__ == "__main__":
    main(sys.argv[1:])
