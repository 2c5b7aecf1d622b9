"""Side by side on this CPU: our train step vs transformers (PyTorch) vs MaxText.

Not part of CI (it needs torch and, for MaxText, a Python 3.12 venv). Every framework
trains the SAME decoder (GPT-2 and Llama architectures at one small size, float32,
batch x seq_len synthetic tokens, AdamW with global-norm clipping, no dropout) in its
own subprocess, so each one's peak RSS (the kernel's ru_maxrss of that process,
interpreter and libraries included) is its own:

  zoo          zoo.training's step (the one train.py runs), jitted, donated
  transformers AutoModelForCausalLM.from_config(zoo.hf.config_to_hf(cfg)), eager
               PyTorch, torch.optim.AdamW + clip_grad_norm_
  maxtext      maxtext.trainers.pre_train.train with hardware=cpu dataset_type=synthetic
               on the same Llama shape (decoder_block llama2: RMSNorm, SwiGLU, RoPE, GQA),
               tokens/s read from its metrics_file (median over steps after warm-up)

tokens/s = batch * seq_len * timed steps / wall time of those steps (after warm-up
steps; compile time excluded). Ratios are zoo / peer.

MaxText needs Python >= 3.12 and its `tpu` extra's requirements minus libtpu and the
nvidia packages; this script uses the interpreter given by --maxtext-python (default:
$MAXTEXT_PYTHON, else .venv-maxtext/bin/python in the repository) and says how to
build one when there is none:

    ~/.pyenv/versions/3.12.1/bin/python -m venv .venv-maxtext
    .venv-maxtext/bin/pip download maxtext==0.2.5 --no-deps -d /tmp/mtx && unzip -q -o /tmp/mtx/maxtext-*.whl \\
        'maxtext-*.dist-info/METADATA' -d /tmp/mtx
    grep "extra == 'tpu'" /tmp/mtx/maxtext-*.dist-info/METADATA | sed -E 's/^Requires-Dist: //; s/ *;.*//' \\
        | grep -viE '^(libtpu|nvidia|jax-cuda|cuda)' > /tmp/mtx/req.txt
    .venv-maxtext/bin/pip install -r /tmp/mtx/req.txt && .venv-maxtext/bin/pip install --no-deps maxtext==0.2.5

    python -m benchmarks.peers                        # gpt2 + llama vs transformers, llama vs MaxText
    python -m benchmarks.peers --batch-size 16 --seq-len 256 --steps 10
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from benchmarks.common import RESULTS_DIR, device_info, markdown_table, time_train_steps, write_json
from zoo.argtypes import non_negative_int, positive_int
from zoo.models.gpt2.config import GPT2Config
from zoo.models.llama.config import LlamaConfig
from zoo.sharding import make_mesh
from zoo.training.optimizer import OptimConfig
from zoo.training.step import make_trainer

ROOT = Path(__file__).resolve().parent.parent
MARK = "PEER_RESULT "
# One small size per architecture, shared by every framework (float32: this is a CPU).
SHAPES = {
    "gpt2": dict(vocab_size=8192, hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024,
                 max_seq_len=1024, dtype="float32", param_dtype="float32"),
    "llama": dict(vocab_size=8192, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=768,
                  max_seq_len=1024, dtype="float32", param_dtype="float32", tie_word_embeddings=False),
}
LR, CLIP = 1e-3, 1.0


def peer_config(family: str):
    """The zoo config of the shared decoder for a family ("gpt2" or "llama")."""
    cls = {"gpt2": GPT2Config, "llama": LlamaConfig}[family]
    return cls(name=f"peer-{family}", **SHAPES[family])


def _batches(vocab: int, batch: int, seq_len: int, n: int = 2):
    rng = np.random.default_rng(0)
    return [rng.integers(0, vocab, (batch, seq_len), dtype=np.int32) for _ in range(n)]


def worker_zoo(family: str, batch: int, seq_len: int, steps: int, warmup: int) -> dict:
    """Our step: zoo.training.step.make_trainer on this host's one CPU device."""
    cfg = peer_config(family)
    mesh = make_mesh("fsdp=-1", devices=jax.devices()[:1])
    opt = OptimConfig(lr=LR, warmup_steps=0, decay_steps=steps + warmup, clip_norm=CLIP, weight_decay=0.0)
    t0 = time.perf_counter()
    trainer = make_trainer(cfg, mesh, opt, batch_size=batch, seq_len=seq_len)
    compile_s = time.perf_counter() - t0
    pos = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len)).copy()
    batches = [{"input_ids": ids, "segment_ids": np.ones_like(ids), "positions": pos}
               for ids in _batches(cfg.vocab_size, batch, seq_len)]
    state, metrics, elapsed = time_train_steps(trainer, mesh, batches, warmup=warmup, steps=steps)
    n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    return dict(tokens_per_s=batch * seq_len * steps / elapsed, step_ms=1e3 * elapsed / steps, compile_s=compile_s,
                params=n_params, loss=float(metrics["loss"]), version=f"jax {jax.__version__}")


def worker_torch(family: str, batch: int, seq_len: int, steps: int, warmup: int) -> dict:
    """transformers' model of the same config, trained eagerly with torch.optim.AdamW."""
    import torch
    import transformers

    from zoo.hf.convert import config_to_hf  # local import: the torch worker's only zoo dependency

    cfg = peer_config(family)
    hf = config_to_hf(cfg)
    model_type = hf.pop("model_type")
    hf.pop("architectures", None)
    hf_cfg = transformers.AutoConfig.for_model(model_type, **hf)
    for drop in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_dropout"):
        if hasattr(hf_cfg, drop):
            setattr(hf_cfg, drop, 0.0)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    batches = [torch.as_tensor(ids, dtype=torch.long) for ids in _batches(cfg.vocab_size, batch, seq_len)]

    def step(ids):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for i in range(warmup):
        step(batches[i % 2])
    t0 = time.perf_counter()
    for i in range(steps):
        loss = step(batches[i % 2])
    elapsed = time.perf_counter() - t0
    return dict(tokens_per_s=batch * seq_len * steps / elapsed, step_ms=1e3 * elapsed / steps, compile_s=0.0,
                params=sum(p.numel() for p in model.parameters()), loss=float(loss),
                version=f"torch {torch.__version__}, transformers {transformers.__version__}, "
                        f"{torch.get_num_threads()} threads")


def maxtext_args(family: str, batch: int, seq_len: int, steps: int, out_dir: str, metrics_file: str) -> list[str]:
    """MaxText overrides describing the shared Llama decoder (base.yml keys)."""
    s = SHAPES[family]
    return ["run_name=zoo-peer", f"base_output_directory={out_dir}", "hardware=cpu",
            "skip_jax_distributed_system=true", "dataset_type=synthetic", f"steps={steps}",
            f"per_device_batch_size={batch}", f"max_target_length={seq_len}", f"base_emb_dim={s['hidden_size']}",
            f"base_num_query_heads={s['num_heads']}", f"base_num_kv_heads={s['num_kv_heads']}",
            f"base_mlp_dim={s['intermediate_size']}", f"base_num_decoder_layers={s['num_layers']}",
            f"head_dim={s['hidden_size'] // s['num_heads']}", f"vocab_size={s['vocab_size']}",
            "decoder_block=llama2", "logits_via_embedding=false", "enable_checkpointing=false",
            f"metrics_file={metrics_file}", "dtype=float32", "weight_dtype=float32", "attention=dot_product",
            "enable_dropout=false", "log_period=1", f"learning_rate={LR}", f"gradient_clipping_threshold={CLIP}",
            "remat_policy=minimal_with_context"]  # saves the most, as our remat "none"


def _run(cmd: list[str], env: dict, log_path: str) -> tuple[int, int, float]:
    """Runs cmd with stdout+stderr to log_path: (exit status, peak RSS bytes of that process, wall s)."""
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss * 1024, time.perf_counter() - t0


def _env() -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    # one real CPU device, as a user's run has (tests may have asked for fake devices)
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if "force_host_platform_device_count" not in f)
    return env


def run_worker(name: str, family: str, args, tmp: str) -> dict:
    """One framework on one family in its own process; the figures plus that process's peak RSS."""
    row = dict(framework=name, family=family, batch=args.batch_size, seq_len=args.seq_len)
    log = os.path.join(tmp, f"{name}-{family}.log")
    if name == "maxtext":
        python = args.maxtext_python
        if not python or not os.path.exists(python):
            return dict(row, status="not installed",
                        reason=f"no MaxText interpreter at {python!r}; see `python -m benchmarks.peers --help`")
        metrics = os.path.join(tmp, "maxtext_metrics.jsonl")
        steps = args.steps + args.warmup
        cmd = [python, "-m", "maxtext.trainers.pre_train.train", _maxtext_base_yml(python)] + \
            maxtext_args(family, args.batch_size, args.seq_len, steps, os.path.join(tmp, "maxtext"), metrics)
        rc, rss, wall = _run(cmd, _env(), log)
        if rc or not os.path.exists(metrics):
            return dict(row, status="failed", reason=f"exit {rc}; log: {_tail(log)}")
        records = [json.loads(line) for line in open(metrics) if line.strip()]
        step_s = [r["perf/step_time_seconds"] for r in records[args.warmup:] if "perf/step_time_seconds" in r]
        if not step_s:
            return dict(row, status="failed", reason=f"no perf/step_time_seconds in {metrics}")
        med = statistics.median(step_s)
        loss = records[-1].get("learning/loss")
        return dict(row, status="ok", params=_maxtext_params(log), tokens_per_s=args.batch_size * args.seq_len / med,
                    step_ms=1e3 * med,
                    peak_rss_mib=rss / 2**20, wall_s=wall, loss=loss, version=_maxtext_version(python))
    cmd = [sys.executable, "-m", "benchmarks.peers", "--worker", name, "--family", family,
           "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--steps", str(args.steps),
           "--warmup", str(args.warmup)]
    rc, rss, wall = _run(cmd, _env(), log)
    line = next((l for l in open(log) if l.startswith(MARK)), None)
    if rc or line is None:
        return dict(row, status="failed", reason=f"exit {rc}; log: {_tail(log)}")
    return dict(row, status="ok", peak_rss_mib=rss / 2**20, wall_s=wall, **json.loads(line[len(MARK):]))


def _maxtext_params(log_path: str) -> float | None:
    """The parameter count MaxText logs ("number parameters: 0.007 billion"), in parameters."""
    import re

    m = re.search(r"number parameters: ([\d.]+) billion", Path(log_path).read_text())
    return float(m.group(1)) * 1e9 if m else None


def _tail(path: str, n: int = 400) -> str:
    return Path(path).read_text()[-n:].replace("\n", " | ")


def _maxtext_base_yml(python: str) -> str:
    out = subprocess.run([python, "-c", "import maxtext, os; print(os.path.dirname(maxtext.__file__))"],
                         capture_output=True, text=True, check=True)
    return os.path.join(out.stdout.strip(), "configs", "base.yml")


def _maxtext_version(python: str) -> str:
    out = subprocess.run([python, "-c", "import importlib.metadata as m, jax; "
                                        "print('maxtext', m.version('maxtext'), 'jax', jax.__version__)"],
                         capture_output=True, text=True)
    return out.stdout.strip()


def build_parser() -> argparse.ArgumentParser:
    """Flags of `python -m benchmarks.peers`."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.peers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", nargs="+", default=["gpt2", "llama"], choices=sorted(SHAPES),
                   help="architectures to compare (default: %(default)s); MaxText runs the llama one")
    p.add_argument("--frameworks", nargs="+", default=["zoo", "transformers", "maxtext"],
                   choices=["zoo", "transformers", "maxtext"], help="which to run (default: all)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="rows per step (default: %(default)s)")
    p.add_argument("--seq-len", type=positive_int, default=256, help="tokens per row (default: %(default)s)")
    p.add_argument("--steps", type=positive_int, default=10, help="timed steps (default: %(default)s)")
    p.add_argument("--warmup", type=non_negative_int, default=3, help="untimed steps first (default: %(default)s)")
    p.add_argument("--maxtext-python", default=os.environ.get("MAXTEXT_PYTHON", str(ROOT / ".venv-maxtext/bin/python")),
                   help="Python of a venv with maxtext installed (default: $MAXTEXT_PYTHON or .venv-maxtext)")
    p.add_argument("--out", default=str(RESULTS_DIR), help="results directory (default: benchmarks/results)")
    p.add_argument("--worker", choices=["zoo", "transformers"], help=argparse.SUPPRESS)
    p.add_argument("--family", choices=sorted(SHAPES), help=argparse.SUPPRESS)
    return p


def main(argv=None) -> dict | None:
    """Runs every framework on every family, prints the table and ratios, writes peers_cpu.json/.md."""
    args = build_parser().parse_args(argv)
    if args.worker:
        fn = worker_zoo if args.worker == "zoo" else worker_torch
        print(MARK + json.dumps(fn(args.family, args.batch_size, args.seq_len, args.steps, args.warmup)), flush=True)
        return None
    jobs = [(fw, fam) for fam in args.families for fw in args.frameworks if fw != "maxtext" or fam == "llama"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for fw, fam in tqdm(jobs, desc="peers", unit="run", dynamic_ncols=True):
            row = run_worker(fw, fam, args, tmp)
            rows.append(row)
            shown = f"{row['tokens_per_s']:,.0f} tokens/s, peak RSS {row['peak_rss_mib']:.0f} MiB" \
                if row["status"] == "ok" else f"{row['status']}: {row['reason']}"
            tqdm.write(f"{fw:>12} {fam:<6} {shown}")
    for row in rows:
        ours = next((r for r in rows if r["framework"] == "zoo" and r["family"] == row["family"]
                     and r["status"] == "ok"), None)
        if row["framework"] != "zoo" and row["status"] == "ok" and ours:
            row["zoo_speedup"] = ours["tokens_per_s"] / row["tokens_per_s"]
            row["zoo_rss_ratio"] = ours["peak_rss_mib"] / row["peak_rss_mib"]
            print(f"{row['family']}: zoo is {row['zoo_speedup']:.2f}x the tokens/s of {row['framework']} with "
                  f"{row['zoo_rss_ratio']:.2f}x its peak RSS")
    missing = [r for r in rows if r["framework"] == "maxtext" and r["status"] == "not installed"]
    if missing:
        print(f"MaxText not installed ({missing[0]['reason']}); build its venv with the commands in "
              "`python -m benchmarks.peers --help`, or pass --maxtext-python")
    payload = dict(device=device_info(), shapes=SHAPES, batch=args.batch_size, seq_len=args.seq_len,
                   steps=args.steps, warmup=args.warmup, rows=rows)
    path = write_json("peers_cpu", payload, args.out)
    table = markdown_table([r for r in rows if r["status"] == "ok"],
                           ["framework", "family", "params", "tokens_per_s", "step_ms", "peak_rss_mib",
                            "zoo_speedup", "zoo_rss_ratio", "version"])
    path.with_suffix(".md").write_text(table + "\n")
    print(table)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main(sys.argv[1:])
