"""Every benchmark in a small mode: it runs and writes well-formed JSON whose figures
agree with facts computed independently here (FLOP conventions, parameter counts,
train-state bytes, memory components, the fits verdict). No timing thresholds.

The planner test compiles a real-size preset (llama3.2-1b) for a TPU topology."""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
import train
import zoo
from benchmarks import attention, plan, throughput

GIB = 1024**3


def _load(path):
    with open(path) as f:
        return json.load(f)


def test_attention_small_mode(tmp_path):
    payload = attention.main(["--shapes", "1x64x2x32", "--mode", "fwd", "fwd+bwd", "--causal", "both",
                              "--warmup", "0", "--repeats", "1", "--out", str(tmp_path), "--name", "attn"])
    data = _load(tmp_path / "attn.json")
    assert data["rows"] == json.loads(json.dumps(payload["rows"]))
    assert (tmp_path / "attn.png").stat().st_size > 0
    md = (tmp_path / "attn.md").read_text()
    assert data["matmul_peak_tflops"] > 0 and data["peak_tflops"] is None  # CPU: no datasheet peak
    assert data["device"]["platform"] == "cpu" and data["device"]["jax_version"] and data["device"]["date"]
    # every implementation, ours and every peer, has a row for every (causal, mode): a figure or a reason
    configs = {(c, m) for c in (False, True) for m in ("fwd", "fwd+bwd")}
    for impl in attention.IMPLEMENTATIONS:
        mine = [r for r in data["rows"] if r["impl"] == impl]
        assert {(r["causal"], r["mode"]) for r in mine} == configs, impl
        for r in mine:
            assert r["status"] == "ok" or (r["status"] == "n/a" and r["reason"]), r
        assert impl in md
    status = {r["impl"]: r["status"] for r in data["rows"]}
    assert {i for i, s in status.items() if s == "ok"} == {"pallas", "xla", "jax_nn_xla"}
    # peers that cannot run on CPU say why (a platform, or tokamax not installed), never a figure
    for impl in ("cudnn", "splash", "mgpu", "jax_pallas", "pallas_triton", *attention.TOKAMAX):
        assert status[impl] == "n/a"
        assert f"n/a: {next(r['reason'] for r in data['rows'] if r['impl'] == impl)}" in md
    # FlashAttention's convention by hand for B=1, T=S=64, N=2, H=32: 4*B*N*T*S*H = 1,048,576 forward,
    # causal counts half, fwd+bwd = fwd + 2.5x fwd
    hand = {(False, "fwd"): 1_048_576, (True, "fwd"): 524_288, (False, "fwd+bwd"): 3_670_016,
            (True, "fwd+bwd"): 1_835_008}
    for (causal, mode), flops in hand.items():
        assert attention.attention_flops(1, 64, 64, 2, 32, causal, mode) == flops
    ok = [r for r in data["rows"] if r["status"] == "ok"]
    assert len(ok) == 3 * 4
    for r in ok:
        assert r["flops"] == hand[(r["causal"], r["mode"])]
        assert r["time_ms"] > 0
        assert r["tflops"] == pytest.approx(r["flops"] / (r["time_ms"] / 1e3) / 1e12, rel=1e-9)
        assert r["pct_peak"] is None
        assert r["pct_matmul"] == pytest.approx(100 * r["tflops"] / data["matmul_peak_tflops"], rel=1e-9)
        assert r["interpret"] == (r["impl"] == "pallas")  # CPU: our kernel runs interpreted, and says so
    assert "pallas (interpret)" in md


def test_attention_shapes_and_peaks():
    assert attention.parse_shape("2x8192x16x128") == (2, 8192, 16, 128, 16)
    assert attention.parse_shape("32x4096x32x128x8") == (32, 4096, 32, 128, 8)
    for bad in ("2x8192x16", "2x8192x16x128x3", "2x0x16x128", "axbxcxd"):
        with pytest.raises(argparse.ArgumentTypeError):
            attention.parse_shape(bad)
    assert attention.device_peak_tflops("NVIDIA H100 80GB HBM3")[0] == 989
    assert attention.device_peak_tflops("NVIDIA H200")[0] == 989
    assert attention.device_peak_tflops("NVIDIA A100-SXM4-80GB")[0] == 312
    assert attention.device_peak_tflops("TPU v5 lite")[0] == 197
    assert attention.device_peak_tflops("TPU v5p")[0] == 459
    assert attention.device_peak_tflops("TPU v6 lite")[0] == 918
    assert attention.device_peak_tflops("cpu")[0] is None
    # which peers a GPU would run, decided before any call
    assert attention.unavailable("cudnn", "gpu", jnp.bfloat16, (9, 0)) is None
    assert attention.unavailable("pallas_triton", "gpu", jnp.bfloat16, (8, 0)) is None
    assert "TPU" in attention.unavailable("splash", "gpu", jnp.bfloat16, (9, 0))
    if attention.mgpu is not None:
        assert attention.unavailable("mgpu", "gpu", jnp.bfloat16, (9, 0)) is None
        assert "sm80" in attention.unavailable("mgpu", "gpu", jnp.bfloat16, (8, 0))
        assert "bf16/fp16 only" in attention.unavailable("mgpu", "gpu", jnp.float32, (9, 0))


@pytest.mark.skipif(attention.splash is None, reason="this jax has no splash attention")
def test_attention_splash_peer_matches_reference_in_interpret_mode():
    # the TPU-only peer's wrapper (layout, scale, GQA, causal mask), checked on CPU in interpret mode
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (1, 256, 4, 128))
    k, v = (jax.random.normal(x, (1, 256, 2, 128)) for x in (kk, kv))

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * jnp.arange(128.0))

    ours = jax.value_and_grad(loss(lambda *a: attention._splash(*a, True, interpret=True)), argnums=(0, 1, 2))
    ref = jax.value_and_grad(loss(lambda *a: kernels.reference_attention(*a, causal=True)), argnums=(0, 1, 2))
    (val, grads), (ref_val, ref_grads) = ours(q, k, v), ref(q, k, v)
    assert val == pytest.approx(float(ref_val), rel=1e-5)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)


GPU_SUITE = Path(attention.__file__).with_name("gpu_suite.sh")


def test_gpu_suite_parses_and_refuses_without_gpu(tmp_path):
    bash = shutil.which("bash")
    assert subprocess.run([bash, "-n", str(GPU_SUITE)], capture_output=True).returncode == 0
    results = sorted(p.name for p in GPU_SUITE.with_name("results").iterdir())
    # a PATH without nvidia-smi (an empty folder): one line on stderr, exit 2, nothing written
    run = subprocess.run([bash, str(GPU_SUITE)], env={"PATH": str(tmp_path)}, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 2 and run.stdout == ""
    assert len(run.stderr.strip().splitlines()) == 1 and "no NVIDIA GPU" in run.stderr
    assert sorted(p.name for p in GPU_SUITE.with_name("results").iterdir()) == results


def test_throughput_small_mode(tmp_path):
    payload = throughput.main(["--models", "tiny-llama", "--devices", "2", "--batch-size", "4", "--seq-len", "32",
                               "--steps", "2", "--warmup", "1", "--out", str(tmp_path), "--name", "tp"])
    data = _load(tmp_path / "tp.json")
    assert data["rows"] == json.loads(json.dumps(payload["rows"]))
    assert (tmp_path / "tp.png").stat().st_size > 0
    md = (tmp_path / "tp.md").read_text()
    peak = data["peak_flops_per_device"]
    assert peak > 0
    for r in data["rows"]:
        cfg = zoo.config(r["model"])
        assert r["status"] == "ok" and r["model"] in md
        assert r["params"] == zoo.param_count(cfg)
        assert r["devices"] == 2
        assert r["tokens_per_s"] > 0 and r["step_ms"] > 0 and r["compile_s"] > 0
        assert r["tokens_per_s"] == pytest.approx(4 * 32 / (r["step_ms"] / 1e3), rel=1e-6)
        assert r["flops_per_token"] == cfg.flops_per_token(32)
        assert r["mfu"] == pytest.approx(r["flops_per_token"] * r["tokens_per_s"] / (r["devices"] * peak), rel=1e-6)
        assert 0 < r["mfu"] and math.isfinite(r["final_loss"])
        # CPU: memory is the compiled step's per-device figure, at least the fp32 params + Adam moments shard
        assert r["memory_source"] == "compiled memory_analysis"
        assert r["peak_memory_bytes"] == r["compiled_bytes"] >= 3 * 4 * r["params"] / r["devices"]


def _check_plan(r, cfg, *, devices, capacity_gib, batch, seq, batch_shards, tight=True):
    assert r["capacity_bytes"] == capacity_gib * GIB
    assert r["devices"] == devices
    assert r["params"] == zoo.param_count(cfg)
    assert r["flops_per_step"] == cfg.flops_per_token(seq) * batch * seq
    assert r["flops_per_device"] == pytest.approx(r["flops_per_step"] / devices)
    assert r["fits"] == (r["hbm_bytes"] <= r["capacity_bytes"])
    assert r["hbm_bytes"] == r["argument_bytes"] + r["output_bytes"] + r["temp_bytes"] - r["alias_bytes"]
    # fp32 params + two Adam moments: at least an even share of 12 bytes per parameter
    state = r["state_bytes_per_device"]
    assert state >= 12 * r["params"] / devices
    # the arguments are that state plus this device's rows of the batch (3 int32 fields at most),
    # give or take the TPU's tile padding of small arrays (which dominates for tiny models: not tight)
    assert state <= r["argument_bytes"]
    if tight:
        assert r["argument_bytes"] <= 1.001 * state + 3 * 4 * (batch // batch_shards) * seq + 2**16
    assert r["alias_bytes"] >= 0.99 * state  # the state is donated: updated in place


@pytest.mark.tpu_aot
def test_plan_real_size_preset_on_tpu_topology(tmp_path):
    # One row of the --table path: llama3.2-1b (real size) on a v5e 2x2 slice.
    rows = (("llama3.2-1b", "v5e-4", "fsdp=-1", 8, 128, "full"),)
    payload = plan.run_table(rows, out_dir=tmp_path)
    data = _load(tmp_path / "plan_tpu.json")
    assert "llama3.2-1b" in (tmp_path / "plan_tpu.md").read_text()
    (r,) = data["rows"]
    assert r == json.loads(json.dumps(payload["rows"][0]))
    assert r["status"] == "compiled" and r["topology"] == "v5e:2x2" and r["device_kind"] == "TPU v5 lite"
    _check_plan(r, zoo.config("llama3.2-1b", remat="full"), devices=4, capacity_gib=16, batch=8, seq=128,
                batch_shards=4)
    # every large matrix splits over fsdp=4: the state is within 1% of an even quarter
    assert r["state_bytes_per_device"] == pytest.approx(12 * r["params"] / 4, rel=0.01)
    assert r["fits"] is True
    # XLA counts each scanned layer once, so its figure is well below the analytic one
    assert 0 < r["xla_flops_per_device"] < r["flops_per_device"]


@pytest.mark.tpu_aot
def test_plan_compiler_oom_is_a_no():
    # Without remat, 2 x 4096 tokens per chip of llama3.2-1b need ~27 GiB of activations: v5e has 16.
    cfg = zoo.config("llama3.2-1b", remat="none")
    r = plan.plan(cfg, "v5e:2x2", batch_size=8, seq_len=4096)
    assert r["status"] == "compiler OOM" and r["fits"] is False
    assert r["hbm_bytes"] > r["compiler_available_bytes"] and r["hbm_bytes"] > r["capacity_bytes"]
    assert 15 * GIB <= r["compiler_available_bytes"] <= 16 * GIB  # v5e: 16 GiB less the runtime's share
    # the needed figure covers the train state too (~3.45 GiB/device) and 2 rows x 4096 of activations
    assert r["hbm_bytes"] > r["state_bytes_per_device"] == pytest.approx(12 * r["params"] / 4)
    assert "DOES NOT FIT" in plan.format_plan(r)


@pytest.mark.tpu_aot
@pytest.mark.newest_jax_leg  # two ~50 s compiles: CI runs it on the newest-JAX leg only
def test_plan_blockwise_loss_frees_the_logits():
    # 2 rows x 1024 tokens per v5p chip at a 32768 vocabulary: the bfloat16 logits are 128 MiB per chip
    # (XLA fuses their float32 cast into the softmax, so it never holds the 256 MiB float32 ones whole).
    # The blockwise cross-entropy (the default) must save at least the logits XLA holds.
    temp = {}
    for block in (0, 4096):
        cfg = zoo.config("tiny-llama", vocab_size=32768, max_seq_len=1024, remat="full", loss_vocab_block=block)
        r = plan.plan(cfg, "v5p:2x2x1", batch_size=8, seq_len=1024)
        assert r["status"] == "compiled"
        temp[block] = r["temp_bytes"]
    assert temp[0] - temp[4096] >= 2 * 1024 * 32768 * 2, temp  # measured: 289 -> 41 MiB


def test_topology_names():
    assert plan.canonical_topology("v5p-8") == "v5p:2x2x1"
    assert plan.canonical_topology("v5p-128") == "v5p:4x4x4"
    assert plan.canonical_topology("v5litepod-16") == "v5e:4x4"
    assert plan.canonical_topology("v6e:2x2") == "v6e:2x2"
    assert plan.slice_name("v5p:4x4x8") == "v5p-256" and plan.slice_name("v5e:16x16") == "v5e-256"
    for bad in ("v5p-7", "v7x:2x2", "tpu"):
        with pytest.raises(plan.PlanError):
            plan.canonical_topology(bad)


@pytest.mark.tpu_aot
def test_train_compile_only_through_train_main(capsys):
    out = train.main(["--compile-only", "--topology", "v5p-8", "--model", "tiny-llama", "--batch-size", "8",
                      "--seq-len", "64", "--mesh", "data=2,fsdp=2"])
    assert isinstance(out, dict) and out["status"] == "compiled"
    assert out["topology"] == "v5p:2x2x1" and out["mesh"] == "data=2,fsdp=2" and out["fits"] is True
    _check_plan(out, zoo.config("tiny-llama"), devices=4, capacity_gib=95, batch=8, seq=64, batch_shards=4,
                tight=False)
    assert "FITS" in capsys.readouterr().out
    # --topology alone implies --compile-only; flags that cannot work fail with status 2 before compiling
    assert train.main(["--topology", "v5p-8", "--model", "tiny-llama", "--batch-size", "6"]) == 2
    assert train.main(["--topology", "v5p-7", "--model", "tiny-llama"]) == 2
    assert "v5p-7" in capsys.readouterr().err


@pytest.mark.torch
def test_generate_benchmark_small_mode(tmp_path):
    from benchmarks import generate

    payload = generate.main(["--batch-sizes", "1", "2", "--prompt-len", "8", "--new-tokens", "4", "--hidden", "64",
                             "--layers", "1", "--repeats", "1", "--out", str(tmp_path), "--name", "gen"])
    data = _load(tmp_path / "gen.json")
    assert data["rows"] == json.loads(json.dumps(payload["rows"]))
    assert {(r["impl"], r["batch"]) for r in data["rows"]} == {(i, b) for i in ("zoo", "transformers") for b in (1, 2)}
    for r in data["rows"]:
        assert r["ttft_ms"] > 0 and r["decode_tokens_per_s"] > 0 and r["new_tokens"] == 4
    for b in (1, 2):
        ours, theirs = (next(r for r in data["rows"] if r["impl"] == i and r["batch"] == b)
                        for i in ("zoo", "transformers"))
        assert ours["speedup_vs_transformers"] == pytest.approx(
            ours["decode_tokens_per_s"] / theirs["decode_tokens_per_s"], rel=1e-9)


@pytest.mark.torch
def test_peers_small_mode_zoo_and_transformers(tmp_path):
    from benchmarks import peers

    payload = peers.main(["--families", "llama", "--frameworks", "zoo", "transformers", "--batch-size", "2",
                          "--seq-len", "16", "--steps", "2", "--warmup", "1", "--out", str(tmp_path)])
    data = _load(tmp_path / "peers_cpu.json")
    assert data["rows"] == json.loads(json.dumps(payload["rows"]))
    rows = {r["framework"]: r for r in data["rows"]}
    assert set(rows) == {"zoo", "transformers"}
    for r in rows.values():
        assert r["status"] == "ok", r
        assert r["tokens_per_s"] > 0 and r["peak_rss_mib"] > 0
        assert r["step_ms"] == pytest.approx(1e3 * 2 * 16 / r["tokens_per_s"], rel=1e-6)
    # both frameworks trained the same architecture: the same parameter count
    assert rows["zoo"]["params"] == rows["transformers"]["params"] == zoo.param_count(peers.peer_config("llama"))
    assert rows["transformers"]["zoo_speedup"] == pytest.approx(
        rows["zoo"]["tokens_per_s"] / rows["transformers"]["tokens_per_s"], rel=1e-9)


@pytest.mark.parametrize("module", ["attention", "throughput", "plan", "generate", "peers"])
def test_benchmarks_run_from_any_directory_and_refuse_zero_sizes(module, tmp_path):
    import os
    import subprocess
    import sys

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    help_run = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", "--help"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
    assert help_run.returncode == 0, help_run.stderr[-2000:]  # importable outside the repository root
    flag = {"attention": "--seq-lens", "throughput": "--seq-len", "plan": "--seq-len", "generate": "--new-tokens",
            "peers": "--seq-len"}[module]
    zero = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", flag, "0"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert zero.returncode == 2 and f"argument {flag}: expected a positive integer, got '0'" in zero.stderr
    assert os.listdir(tmp_path) == []  # nothing written
