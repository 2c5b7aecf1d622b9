#!/usr/bin/env bash
# The GPU suite: what a person with one H100/H200 runs (under 8 minutes) and commits.
#
#   bash benchmarks/gpu_suite.sh            # PYTHON=... to pick the interpreter (default: python)
#
# Steps, each under its own time budget (`timeout`; 445 s in all, so the suite ends within 8 minutes;
# a step that fails or runs out of time is recorded and the suite goes on, exiting 1 at the end;
# the attention steps stop starting new calls a little before their budget: "n/a: skipped" rows):
#   1. pytest -m gpu                           (log: pytest_gpu.log)
#   2. attention forward, bf16, causal and not, at 2x8192x16x128, 1x16384x16x128,
#      32x4096x32x128 with 8 KV heads, 2x8192x32x64 and 2x8192x8x256, every peer of
#      benchmarks/attention.py (n/a rows say why a peer cannot run)   (attention_fwd.*)
#   3. the same, forward + backward                                   (attention_fwd_bwd.*)
#   4. GPT-2 124M train-step throughput and MFU (benchmarks/throughput.py)   (throughput_gpt2.*)
# Everything lands in a new folder benchmarks/results/gpu_suite_<date>_<time>/: JSON + markdown
# + PNG per step, each step's log, suite.json and SUMMARY.md (device name, driver version,
# jax version, date, per-step status and seconds). Without a GPU it exits 2 at once.
set -euo pipefail

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
    echo "gpu_suite.sh: no NVIDIA GPU here (nvidia-smi missing or lists none); this suite needs one H100/H200" >&2
    exit 2
fi

cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
if ! "$PY" -c 'import sys, jax; sys.exit(jax.devices()[0].platform != "gpu")' >/dev/null 2>&1; then
    echo "gpu_suite.sh: $PY's jax sees no GPU (install jax with CUDA: pip install -U 'jax[cuda12]')" >&2
    exit 2
fi

GPU="$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -n 1)"
GPU_NAME="${GPU%%,*}"
DRIVER="$(echo "${GPU#*,}" | tr -d ' ')"
JAX_VERSION="$("$PY" -c 'import jax; print(jax.__version__)')"
STAMP="$(date -u +%Y-%m-%d_%H%M%S)"
OUT="benchmarks/results/gpu_suite_${STAMP}"
if [[ -e "$OUT" ]]; then
    echo "gpu_suite.sh: $OUT exists; refusing to write into it" >&2
    exit 2
fi
mkdir -p "$OUT"
echo "== GPU suite: $GPU_NAME, driver $DRIVER, jax $JAX_VERSION, $(date -u +%Y-%m-%dT%H:%M:%SZ) -> $OUT"

SHAPES=(2x8192x16x128 1x16384x16x128 32x4096x32x128x8 2x8192x32x64 2x8192x8x256)
# every peer except our float32 reference "xla" (jax_nn_xla is the XLA peer; the reference's
# float32 logits do not fit at these sizes)
IMPLS=(pallas pallas_triton cudnn jax_nn_xla splash mgpu jax_pallas
       tokamax_mosaic tokamax_triton tokamax_cudnn tokamax_xla)
STEPS=()
FAILED=0

# step NAME SECONDS CMD...: runs CMD under `timeout`, tees its output to NAME.log, records rc and seconds
step() {
    local name="$1" budget="$2"
    shift 2
    echo "== $name (budget ${budget}s): $*"
    local t0=$SECONDS rc=0
    timeout --kill-after=15 "$budget" "$@" 2>&1 | tee "$OUT/$name.log" || rc=$?
    local took=$((SECONDS - t0)) status="ok"
    if [[ $rc -eq 124 || $rc -eq 137 ]]; then
        status="timed out after ${budget}s"
    elif [[ $rc -ne 0 ]]; then
        status="failed (exit $rc)"
    fi
    [[ $status == ok ]] || FAILED=1
    echo "== $name: $status in ${took}s"
    STEPS+=("$name|$status|$took|$budget")
}

step pytest_gpu 90 "$PY" -m pytest -m gpu -p no:cacheprovider -q
ATTN=(-m benchmarks.attention --shapes "${SHAPES[@]}" --dtype bfloat16 --causal both --impls "${IMPLS[@]}"
      --warmup 2 --repeats 5 --out "$OUT")
step attention_fwd 110 "$PY" "${ATTN[@]}" --mode fwd --time-budget 90 --name attention_fwd
step attention_fwd_bwd 170 "$PY" "${ATTN[@]}" --mode fwd+bwd --time-budget 145 --name attention_fwd_bwd
step throughput_gpt2 75 "$PY" -m benchmarks.throughput --models gpt2-124m --batch-size 16 --seq-len 1024 \
    --dtype bfloat16 --steps 20 --warmup 3 --devices 1 --out "$OUT" --name throughput_gpt2

GPU_NAME="$GPU_NAME" DRIVER="$DRIVER" JAX_VERSION="$JAX_VERSION" OUT="$OUT" STEPS="$(printf '%s\n' "${STEPS[@]}")" \
    "$PY" - <<'EOF'
import datetime, json, os, pathlib

out = pathlib.Path(os.environ["OUT"])
steps = [dict(name=n, status=s, seconds=int(t), budget_s=int(b))
         for n, s, t, b in (line.split("|") for line in os.environ["STEPS"].splitlines() if line)]
suite = dict(device=os.environ["GPU_NAME"], driver_version=os.environ["DRIVER"], jax_version=os.environ["JAX_VERSION"],
             date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), steps=steps)
(out / "suite.json").write_text(json.dumps(suite, indent=2) + "\n")
lines = [f"# GPU suite: {suite['device']}, driver {suite['driver_version']}, jax {suite['jax_version']}, "
         f"{suite['date']}", "", "| step | status | seconds | budget (s) |", "|---|---|---|---|"]
lines += [f"| {s['name']} | {s['status']} | {s['seconds']} | {s['budget_s']} |" for s in steps]
for name in ("attention_fwd", "attention_fwd_bwd", "throughput_gpt2"):
    md = out / f"{name}.md"
    if md.exists():
        lines += ["", f"## {name}", "", md.read_text().strip(), "", f"![{name}]({name}.png)"]
(out / "SUMMARY.md").write_text("\n".join(lines) + "\n")
print(f"wrote {out / 'suite.json'} and {out / 'SUMMARY.md'}")
EOF
exit "$FAILED"
