"""Attention kernel benchmark: our Pallas kernel vs the XLA reference vs cuDNN vs JAX's
own Pallas attention ops, over sequence length, head_dim, causal or not, forward and
forward+backward.

FLOP convention (documented, as FlashAttention reports it): forward = 4*B*T*S*N*H
(QK^T and PV), halved when causal; backward = 2.5x forward, so fwd+bwd = 3.5x forward.
TFLOP/s = FLOPs / median time. "% peak" divides by this device's measured dense matmul
throughput (benchmarks.common.matmul_peak_tflops), not a datasheet number.

On CPU the Pallas kernel runs in interpret mode: those figures are labelled
`interpret` and say nothing about accelerator speed.

    python -m benchmarks.attention                 # sizes picked for the backend
    python -m benchmarks.attention --seq-lens 1024 4096 --head-dims 128 --modes fwd
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp

import kernels
from benchmarks.common import RESULTS_DIR, device_info, markdown_table, matmul_peak_tflops, time_fn, write_json
from zoo.argtypes import non_negative_int, positive_int

IMPLEMENTATIONS = ("xla", "pallas", "cudnn", "jax_pallas")


def attention_flops(b, t, s, n, h, causal, mode):
    """FLOPs of one call by the documented convention: 4*B*T*S*N*H forward (x0.5 causal), fwd+bwd 3.5x that."""
    fwd = 4.0 * b * t * s * n * h * (0.5 if causal else 1.0)
    return fwd * (3.5 if mode == "fwd+bwd" else 1.0)


def _jax_shipped_pallas(q, k, v, causal):
    """JAX's own Pallas flash attention for the backend (TPU or GPU op), [B, T, N, H] layout."""
    platform = jax.devices()[0].platform
    if platform == "tpu":
        from jax.experimental.pallas.ops.tpu import flash_attention as tpu_fa

        out = tpu_fa.flash_attention(q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),
                                     causal=causal, sm_scale=q.shape[-1] ** -0.5)
        return out.transpose(0, 2, 1, 3)
    if platform == "gpu":
        from jax.experimental.pallas.ops.gpu import attention as gpu_fa

        return gpu_fa.mha(q, k, v, segment_ids=None, causal=causal, sm_scale=q.shape[-1] ** -0.5)
    raise NotImplementedError("JAX ships Pallas attention ops for TPU and GPU only")


def make_fn(impl, causal, mode):
    """The jitted call to time: attention forward, or the gradient w.r.t. q, k, v of its sum (fwd+bwd)."""
    def fwd(q, k, v):
        if impl == "jax_pallas":
            return _jax_shipped_pallas(q, k, v, causal)
        return kernels.attention(q, k, v, causal=causal, implementation=impl)

    if mode == "fwd":
        return jax.jit(fwd)

    def loss(q, k, v):
        return jnp.sum(fwd(q, k, v).astype(jnp.float32))

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def label(row) -> str:
    """The implementation's name as shown in tables and plots ("pallas (interpret)" on CPU)."""
    return row["impl"] + (" (interpret)" if row.get("interpret") else "")


def run(seq_lens, head_dims, *, batch, heads, kv_heads, dtype, modes, causals, impls, warmup, repeats):
    """Times every implementation on every shape; returns (rows, measured matmul peak TFLOP/s).

    An implementation that cannot serve a shape on this backend gets a row with
    status "n/a" and the reason, never a silent fallback.
    """
    platform = jax.devices()[0].platform
    peak = matmul_peak_tflops(dtype)
    rows = []
    for h in head_dims:
        for t in seq_lens:
            for causal in causals:
                for mode in modes:
                    key = jax.random.key(t * 1000 + h)
                    kq, kk, kv = jax.random.split(key, 3)
                    q = jax.random.normal(kq, (batch, t, heads, h), dtype)
                    k = jax.random.normal(kk, (batch, t, kv_heads, h), dtype)
                    v = jax.random.normal(kv, (batch, t, kv_heads, h), dtype)
                    flops = attention_flops(batch, t, t, heads, h, causal, mode)
                    for impl in impls:
                        row = dict(impl=impl, seq_len=t, head_dim=h, causal=causal, mode=mode, batch=batch,
                                   heads=heads, kv_heads=kv_heads, dtype=jnp.dtype(dtype).name,
                                   interpret=(impl == "pallas" and platform == "cpu"))
                        try:
                            timing = time_fn(make_fn(impl, causal, mode), q, k, v, warmup=warmup, repeats=repeats)
                        except Exception as e:  # an implementation that cannot serve this call says why
                            row.update(status="n/a", reason=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
                        else:
                            tflops = flops / timing["median_s"] / 1e12
                            row.update(status="ok", time_ms=timing["median_s"] * 1e3, tflops=tflops,
                                       pct_peak=100 * tflops / peak)
                        rows.append(row)
                        shown = f"{row['time_ms']:.3f} ms {row['tflops']:.3f} TFLOP/s" if row["status"] == "ok" \
                            else row["reason"]
                        print(f"{impl:>10} T={t:<6} H={h:<4} causal={causal!s:<5} {mode:<8} {shown}", flush=True)
    return rows, peak


def plot(rows, path):
    """TFLOP/s against sequence length, one panel per (mode, causal, head_dim), one line per implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    panels = sorted({(r["mode"], r["causal"], r["head_dim"]) for r in ok})
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, (mode, causal, h) in zip(axes[0], panels):
        for impl in IMPLEMENTATIONS:
            pts = sorted((r["seq_len"], r["tflops"]) for r in ok
                         if (r["impl"], r["mode"], r["causal"], r["head_dim"]) == (impl, mode, causal, h))
            if pts:
                first = next(r for r in ok if r["impl"] == impl)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label(first))
        ax.set_xscale("log", base=2)
        ax.set_title(f"{mode}, causal={causal}, H={h}", fontsize=9)
        ax.set_xlabel("sequence length")
        ax.set_ylabel("TFLOP/s")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None):
    """CLI: runs the sweep, prints the table, writes <name>.json, .png and .md."""
    platform = jax.devices()[0].platform
    small = platform == "cpu"
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    p.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"],
                   help="forward only, and/or forward + gradients w.r.t. q, k, v (default: both)")
    p.add_argument("--causal", choices=["both", "true", "false"], default="both",
                   help="causal masking: both, true or false (default: both)")
    p.add_argument("--impls", nargs="+", default=list(IMPLEMENTATIONS), choices=IMPLEMENTATIONS,
                   help="xla: reference; pallas: ours (interpret mode on CPU); cudnn: jax.nn.dot_product_attention "
                        "on GPU; jax_pallas: JAX's shipped TPU/GPU Pallas ops (default: all; n/a rows say why)")
    p.add_argument("--warmup", type=non_negative_int, default=1 if small else 3,
                   help="untimed calls before timing (default: 1 on CPU, 3 elsewhere)")
    p.add_argument("--repeats", type=positive_int, default=3 if small else 20,
                   help="timed calls; the median is reported (default: 3 on CPU, 20 elsewhere)")
    p.add_argument("--out", default=str(RESULTS_DIR), help="directory for attention_<platform>.json/.png")
    p.add_argument("--name", default=None, help="result file stem (default attention_<platform>)")
    args = p.parse_args(argv)
    causals = {"both": [False, True], "true": [True], "false": [False]}[args.causal]
    rows, peak = run(args.seq_lens, args.head_dims, batch=args.batch, heads=args.heads,
                     kv_heads=args.kv_heads or args.heads, dtype=jnp.dtype(args.dtype), modes=args.modes,
                     causals=causals, impls=args.impls, warmup=args.warmup, repeats=args.repeats)
    name = args.name or f"attention_{platform}"
    payload = dict(device=device_info(), matmul_peak_tflops=peak, rows=rows,
                   flops_convention="fwd 4*B*T*S*N*H (x0.5 causal); fwd+bwd = 3.5x fwd")
    path = write_json(name, payload, args.out)
    png = plot(rows, path.with_suffix(".png"))
    ok = [dict(r, impl=label(r)) for r in rows if r["status"] == "ok"]
    table = markdown_table(ok, ["impl", "seq_len", "head_dim", "causal", "mode", "time_ms", "tflops", "pct_peak"])
    dev = payload["device"]
    na = sorted({f"{r['impl']}: {r['reason']}" for r in rows if r["status"] != "ok"})
    md = path.with_suffix(".md")
    md.write_text(f"{dev['device_kind']}, jax {dev['jax_version']}, {dev['date']}; B={args.batch}, "
                  f"N={args.heads}, K={args.kv_heads or args.heads}, {args.dtype}; measured matmul peak "
                  f"{peak:.3g} TFLOP/s\n\n{table}\n" + "".join(f"\n- n/a {line}" for line in na) + ("\n" if na else ""))
    print(table)
    print(f"measured matmul peak {peak:.3f} TFLOP/s; wrote {path}, {md}" + (f" and {png}" if png else ""))
    return payload


if __name__ == "__main__":
    main(sys.argv[1:])
