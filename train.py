"""Pretrain any zoo decoder with one pjit-sharded train step.

    python train.py                                    # the embedded default (CPU, minutes)
    python train.py --model llama3.1-8b --data corpus/ --mesh fsdp=-1,tensor=4 --out runs/8b

The step `train_step(state, batch) -> (state, metrics)` is the same for every model
and objective. It is jitted once with in/out shardings derived from the parameters'
logical axis names (zoo/sharding.py) and donates the state; the state is initialised
through `jax.eval_shape` and a jit with out_shardings, so the full model never exists
unsharded. Gradient accumulation is a `lax.scan` over microbatches inside the step.

With no arguments this pretrains `small-llama` on the Python standard library's own
sources (a corpus every machine has), trains a sentencepiece tokenizer for it first,
and prints a sample. Its output goes to runs/default; rerunning resumes there (and,
once finished, only samples): pass --out DIR for a fresh run.

Bad flags exit with status 2 and one line on stderr, before anything compiles.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
from typing import NamedTuple

from zoo.argtypes import host_port, non_negative_float, non_negative_int, positive_int

DEFAULT_OUT = os.path.join("runs", "default")
DEFAULT_PROMPT = "def "
# Peak learning rate per --task: from-scratch pretraining of small models takes a large
# one; fine-tuning a trained checkpoint needs a small one (BERT's 2e-5..5e-5, T5's 1e-4..1e-3).
DEFAULT_LR = {"pretrain": 5e-3, "classify": 5e-5, "seq2seq": 3e-4}

# Peak dense bf16 FLOP/s per device (vendor figures), matched as substrings of
# `device.device_kind` in this order. MFU = flops_per_token * tokens/s / (devices * peak).
# CPU has no vendor figure: the peak is a float32 matmul measured once per run on this
# host, shared by its local (possibly fake) devices; --peak-flops overrides any of these.
PEAK_FLOPS = (
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),  # v5e
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),
    ("TPU v6 lite", 918e12),  # v6e (Trillium)
    ("TPU v6e", 918e12),
    ("H200", 989e12),
    ("H100", 989e12),  # SXM
    ("A100", 312e12),
)


class UsageError(Exception):
    """A bad flag or input: reported as one line, exit status 2, before compiling."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + error
        raise UsageError(message)


class _DefaultsFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" where a flag has a default of its own (None defers to the model config)."""

    def _get_help_string(self, action):
        if action.default in (None, False, argparse.SUPPRESS) or "default" in (action.help or ""):
            return action.help
        return f"{action.help} (default: {action.default})"


def build_parser() -> argparse.ArgumentParser:
    """Every flag, with its default in --help."""
    from zoo.configs import DTYPES, REMAT_POLICIES
    from zoo.objectives import OBJECTIVES

    p = _Parser(prog="train.py", description=__doc__.split("\n\n")[0], formatter_class=_DefaultsFormatter,
                epilog=__doc__.split("\n\n")[3])
    g = p.add_argument_group("model")
    g.add_argument("--model", default="small-llama",
                   help="a preset name (see zoo.list_models()) or an HF config.json / model dir, trained from scratch")
    g.add_argument("--dtype", choices=DTYPES, default=None, help="compute dtype (default: the model config's)")
    g.add_argument("--param-dtype", choices=DTYPES, default=None,
                   help="master weight and optimizer dtype (default: the model config's)")
    g.add_argument("--remat", choices=REMAT_POLICIES, default=None,
                   help="activation checkpointing policy per layer (default: the model config's)")
    g.add_argument("--vocab-size", default=None,
                   help="override the model's vocab_size: a number, or 'tokenizer' (the tokenizer's size "
                        "rounded up to a multiple of 128). Default: the model's; a larger tokenizer is an error")
    g = p.add_argument_group("data")
    g.add_argument("--data", nargs="+", default=["stdlib"],
                   help="text / JSONL ('text' field) / ArrayRecord files or directories; 'stdlib' is the Python "
                        "standard library's sources; 'synthetic' is random tokens")
    g.add_argument("--data-max-bytes", type=non_negative_int, default=None,
                   help="index at most this many bytes of the corpus (0: all; default: 0, or 3 MB for stdlib)")
    g.add_argument("--split-bytes", type=non_negative_int, default=2048,
                   help="cut text files longer than this at line ends into documents of at most this size "
                        "(0: whole files; JSONL/ArrayRecord records are never cut)")
    g.add_argument("--shuffle-window", type=non_negative_int, default=128,
                   help="packed rows shuffled within a window of this many rows (0 or 1: off)")
    g.add_argument("--tokenizer", default=None,
                   help="sentencepiece .model or HF tokenizer.json; default: <out>/tokenizer.model, trained on the "
                        "corpus (BPE, the model's vocab size) if missing")
    g.add_argument("--seq-len", type=positive_int, default=256, help="tokens per packed row")
    g.add_argument("--batch-size", type=positive_int, default=8, help="global batch size in rows")
    g.add_argument("--objective", default="clm", choices=sorted(OBJECTIVES), help="training objective")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=positive_int, default=200, help="total optimizer steps")
    g.add_argument("--lr", type=non_negative_float, default=None,
                   help="peak learning rate (default: 5e-3 for pretraining; fine-tuning a trained checkpoint: 5e-5 "
                        "with --task classify, 3e-4 with --task seq2seq)")
    g.add_argument("--warmup-steps", type=non_negative_int, default=10, help="linear warmup steps")
    g.add_argument("--decay-steps", type=positive_int, default=None,
                   help="length of warmup + cosine decay (default: --steps)")
    g.add_argument("--min-lr-ratio", type=non_negative_float, default=0.1, help="final lr / peak lr")
    g.add_argument("--weight-decay", type=non_negative_float, default=0.1,
                   help="AdamW decoupled weight decay (not on norms and biases)")
    g.add_argument("--b1", type=non_negative_float, default=0.9, help="Adam beta1 (decay of the gradient mean)")
    g.add_argument("--b2", type=non_negative_float, default=0.95, help="Adam beta2 (decay of the squared-gradient mean)")
    g.add_argument("--eps", type=non_negative_float, default=1e-8, help="Adam epsilon (added to the root of the squared-gradient mean)")
    g.add_argument("--clip-norm", type=non_negative_float, default=1.0, help="global gradient norm clip (0: off)")
    g.add_argument("--grad-accum", type=positive_int, default=1,
                   help="microbatches per step (a lax.scan inside the step); divides --batch-size")
    g.add_argument("--z-loss", type=non_negative_float, default=0.0, help="weight of the logsumexp^2 auxiliary loss")
    g = p.add_argument_group("run")
    g.add_argument("--mesh", default="fsdp=-1",
                   help="mesh axis sizes, e.g. data=2,fsdp=-1,tensor=1 (-1 fills the rest; axes: data, fsdp, "
                        "sequence, tensor, expert)")
    g.add_argument("--seed", type=int, default=0, help="seed of init, data order and sampling")
    g.add_argument("--out", default=DEFAULT_OUT,
                   help="run directory: new, empty, or a train.py run to resume (it resumes when it holds checkpoints; "
                        "one process writes it at a time)")
    g.add_argument("--allow-flag-changes", action="store_true",
                   help="resume even though flags that change the run (--steps, --lr, --seq-len, --batch-size, --data, "
                        "...) differ from the ones in <out>/args.json, and record the new ones there")
    g.add_argument("--checkpoint-every", type=positive_int, default=100, help="save every N steps (and at the end)")
    g.add_argument("--keep-checkpoints", type=positive_int, default=3, help="checkpoints kept (the newest)")
    g.add_argument("--log-every", type=positive_int, default=1, help="write metrics every N steps")
    g.add_argument("--peak-flops", type=non_negative_float, default=None,
                   help="peak FLOP/s per device for MFU (default: the table in train.py, or measured on CPU)")
    g.add_argument("--sample-tokens", type=non_negative_int, default=200,
                   help="tokens to sample from the trained model at the end (0: none)")
    g.add_argument("--sample-prompt", default=DEFAULT_PROMPT, help="prompt of the final sample")
    g.add_argument("--temperature", type=non_negative_float, default=0.7, help="sampling temperature (0: greedy)")
    g.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    g.add_argument("--max-nonfinite", type=positive_int, default=10,
                   help="a step whose loss or gradient norm is not finite leaves the params unchanged (counted in "
                        "metrics as 'nonfinite'); after this many in a row the run saves the last good state and "
                        "stops with exit status 3")
    g = p.add_argument_group("multi-host (jax.distributed; auto-detected on TPU pods, Slurm and Open MPI)")
    g.add_argument("--coordinator", type=host_port, default=None,
                   help="HOST:PORT of process 0's coordinator; with --num-processes and --process-id, for clusters "
                        "JAX cannot detect (every process runs the same command with its own --process-id)")
    g.add_argument("--num-processes", type=positive_int, default=None, help="processes in the job (with --coordinator)")
    g.add_argument("--process-id", type=non_negative_int, default=None,
                   help="this process's index, 0..num-processes-1 (with --coordinator)")
    # Fine-tuning (zoo/finetune.py) and the AOT planner (benchmarks/plan.py) own their flags.
    from benchmarks import plan
    from zoo import finetune

    finetune.add_arguments(p)
    plan.add_train_arguments(p)
    return p


# ------------------------------------------------------------------------ configuration


def load_model_config(name: str, overrides: dict):
    """A preset, or an HF config.json (or a dir holding one), with dtype/remat overrides."""
    import zoo

    if name.endswith(".json") or os.path.isdir(name):
        path = os.path.join(name, "config.json") if os.path.isdir(name) else name
        if not os.path.isfile(path):
            raise UsageError(f"--model {name}: no config.json there")
        try:
            from zoo.hf import config_from_hf
        except ImportError as e:
            raise UsageError(f"--model {name}: HF configs need zoo.hf ({e})") from None
        with open(path) as f:
            try:
                cfg = config_from_hf(json.load(f))
            except (ValueError, KeyError) as e:
                raise UsageError(f"--model {path}: {e}") from None
    else:
        try:
            cfg = zoo.config(name)
        except ValueError as e:
            raise UsageError(str(e)) from None
    try:
        return cfg.replace(**overrides) if overrides else cfg
    except ValueError as e:
        raise UsageError(str(e)) from None


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup, cosine decay and global-norm clipping."""

    lr: float = 5e-3
    warmup_steps: int = 10
    decay_steps: int = 200
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0


def make_optimizer(opt: OptimConfig):
    """(optax transformation, learning-rate schedule)."""
    import jax
    import optax

    warmup = min(opt.warmup_steps, max(opt.decay_steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=opt.lr, warmup_steps=warmup, decay_steps=max(opt.decay_steps, warmup + 1),
        end_value=opt.lr * opt.min_lr_ratio)

    def decay_mask(params):  # no weight decay on norm scales and biases
        def keep(path, _):
            names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
            return names[-1] not in ("scale", "bias")
        return jax.tree_util.tree_map_with_path(keep, params)

    parts = [optax.clip_by_global_norm(opt.clip_norm)] if opt.clip_norm > 0 else []
    parts.append(optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay,
                             mask=decay_mask))
    return optax.chain(*parts), schedule


# ------------------------------------------------------------------------ the train step


@contextlib.contextmanager
def mesh_context(mesh):
    """The mesh and the logical-axis rules, so activation constraints inside models apply."""
    import jax
    from flax import linen as nn

    from zoo.sharding import RULES

    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        yield


class Trainer(NamedTuple):
    """Everything the loop needs: the jitted init and step, and the shardings they use."""

    model: object
    init: object  # rng -> state (sharded)
    step: object  # (state, batch) -> (state, metrics), donating state
    abstract_state: object  # ShapeDtypeStructs with shardings
    state_shardings: object
    batch_sharding: object
    schedule: object


def make_train_step(model, objective, tx, schedule, *, grad_accum: int = 1, z_loss: float = 0.0):
    """The pure step `(state, batch) -> (state, metrics)` shared by every model and objective.

    The batch is split into `grad_accum` microbatches (rows strided, so each one still
    spans every batch shard) and a `lax.scan` adds up their gradients and loss sums;
    the total is divided once by the number of targets, so the result is the
    token-weighted mean over the whole batch whatever the split.
    """
    import jax
    import jax.numpy as jnp
    import optax

    from zoo.sharding import constrain

    def loss_sums(params, batch, rng):
        return objective.loss_fn(model, params, batch, rng, z_loss=z_loss)

    grad_fn = jax.value_and_grad(loss_sums, has_aux=True)

    def train_step(state, batch):
        params = state["params"]
        rng, step_rng = jax.random.split(state["rng"])

        def split(x_BT):
            x_ABT = x_BT.reshape(x_BT.shape[0] // grad_accum, grad_accum, *x_BT.shape[1:]).swapaxes(0, 1)
            return constrain(x_ABT, (None, "batch", "length"))

        micro = {k: split(batch[k]) for k in objective.fields}

        def accumulate(carry, xs):
            grads, sums = carry
            mb, i = xs
            (total, aux), g = grad_fn(params, mb, jax.random.fold_in(step_rng, i))
            grads = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads, g)
            sums = {k: sums[k] + v for k, v in {"loss": total, **aux}.items()}
            return (grads, sums), None

        first = jax.tree.map(lambda x: x[0], micro)
        sums_shape = jax.eval_shape(lambda: {"loss": jnp.zeros(()), **loss_sums(params, first, step_rng)[1]})
        zeros = (jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params),
                 jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), sums_shape))
        (grads, sums), _ = jax.lax.scan(accumulate, zeros, (micro, jnp.arange(grad_accum)))

        weight = jnp.maximum(sums.pop("weight"), 1.0)
        grads = jax.tree.map(lambda g: g / weight, grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        metrics = {k: v / weight for k, v in sums.items()}
        grad_norm = optax.global_norm(grads)
        # A non-finite loss or gradient leaves params and optimizer state as they were
        # (the step counter and rng still advance, so data and schedule stay aligned).
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        keep_if_bad = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        new_params = keep_if_bad(new_params, params)
        opt_state = keep_if_bad(opt_state, state["opt_state"])
        metrics.update(grad_norm=grad_norm, learning_rate=schedule(state["step"]),
                       tokens=jnp.sum(batch["segment_ids"] > 0).astype(jnp.float32), targets=weight,
                       nonfinite=1.0 - finite.astype(jnp.float32))
        new_state = {"step": state["step"] + 1, "params": new_params, "opt_state": opt_state, "rng": rng}
        return new_state, metrics

    return train_step


def make_trainer(cfg, mesh, opt: OptimConfig, *, objective: str = "clm", batch_size: int, seq_len: int,
                 grad_accum: int = 1, z_loss: float = 0.0) -> Trainer:
    """Builds the model, optimizer, shardings, and the jitted init and step for `mesh`."""
    import jax
    import jax.numpy as jnp
    from flax import linen as nn
    from jax.sharding import NamedSharding, PartitionSpec

    import zoo
    from zoo import objectives
    from zoo.sharding import logical_spec, logical_to_sharding

    model = zoo.build(cfg)
    obj = objectives.get(objective)
    tx, schedule = make_optimizer(opt)

    # The init forward runs under the mesh (kernels shard_map over it), so its batch
    # must split over the batch axes; it is traced abstractly or compiled sharded.
    init_rows = mesh.shape["data"] * mesh.shape["fsdp"] * mesh.shape["expert"]

    def boxed_init(rng):
        params = model.init(rng, jnp.zeros((init_rows, seq_len), jnp.int32))["params"]
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params), "rng": rng}

    rng_shape = jax.ShapeDtypeStruct((2,), jnp.uint32)
    with mesh_context(mesh):
        abstract_boxed = jax.eval_shape(boxed_init, rng_shape)
    state_shardings = logical_to_sharding(nn.get_partition_spec(abstract_boxed), mesh)
    abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                  nn.unbox(abstract_boxed), state_shardings)
    init = jax.jit(lambda rng: nn.unbox(boxed_init(rng)), out_shardings=state_shardings)

    batch_sharding = NamedSharding(mesh, logical_spec("batch", "length"))
    step_fn = make_train_step(model, obj, tx, schedule, grad_accum=grad_accum, z_loss=z_loss)
    jitted = jax.jit(step_fn, in_shardings=(state_shardings, {k: batch_sharding for k in obj.fields}),
                     out_shardings=(state_shardings, NamedSharding(mesh, PartitionSpec())), donate_argnums=0)
    abstract_batch = {k: jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32, sharding=batch_sharding)
                      for k in obj.fields}
    with mesh_context(mesh):
        compiled = jitted.lower(abstract_state, abstract_batch).compile()
    return Trainer(model, init, compiled, abstract_state, state_shardings, batch_sharding, schedule)


def init_state(trainer: Trainer, mesh, seed: int):
    """A fresh sharded state: params straight into their shards (never built whole)."""
    import jax

    with mesh_context(mesh):
        return trainer.init(jax.random.PRNGKey(seed))


# ------------------------------------------------------------------------------- logging


def peak_flops_per_device(override: float | None = None) -> tuple[float, str]:
    """(peak FLOP/s per device, where the figure comes from) for the MFU denominator."""
    import jax
    import jax.numpy as jnp

    if override:
        return override, "--peak-flops"
    kind = jax.devices()[0].device_kind
    for name, flops in PEAK_FLOPS:
        if name.lower() in kind.lower():
            return flops, f"table ({name} bf16 dense)"
    # CPU (or unknown): measure a float32 matmul, the best of a few runs, and share it
    # among the host's local devices (fake CPU devices run on the same cores).
    n = 512
    a = jnp.ones((n, n), jnp.float32)
    mm = jax.jit(lambda x: x @ x)
    mm(a).block_until_ready()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        mm(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / jax.local_device_count(), f"measured {kind} f32 matmul"


class MetricsLog:
    """metrics.jsonl (appended across resumes), TensorBoard events, and the history for loss.png.

    `resume_step`: the step a resumed run restarts from. Records after it (written by a
    run killed between checkpoints, and about to be retrained) are dropped from
    metrics.jsonl, and TensorBoard is told to purge its events after that step.
    """

    def __init__(self, out: str, resume_step: int | None = None):
        from tensorboardX import SummaryWriter

        self.path = os.path.join(out, "metrics.jsonl")
        if resume_step is not None and os.path.exists(self.path):
            self._truncate_after(resume_step)
        self.file = open(self.path, "a")
        purge = {} if resume_step is None else {"purge_step": resume_step + 1}
        self.tb = SummaryWriter(os.path.join(out, "tb"), **purge)

    def _truncate_after(self, step: int) -> None:
        with open(self.path) as f:
            lines = f.readlines()
        kept = []
        for line in lines:
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except (ValueError, KeyError, TypeError):  # a line cut short by a kill
                continue
        if len(kept) != len(lines):
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(kept)
            os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)):
                self.tb.add_scalar(f"train/{k}", v, record["step"])

    def history(self) -> list[dict]:
        with open(self.path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def close(self) -> None:
        self.file.close()
        self.tb.close()


def plot_loss(records: list[dict], path: str) -> None:
    """loss against step (the last record per step wins, for runs that resumed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_step = {r["step"]: r["loss"] for r in records}
    steps = sorted(by_step)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, [by_step[s] for s in steps])
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/token)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------- main


def _die(message: str, status: int = 2) -> int:
    print(f"train.py: error: {message}", file=sys.stderr)
    return status


# Environment variables that mark a multi-process job jax.distributed.initialize() can
# configure by itself (TPU pod slices, Slurm, Open MPI, an explicit coordinator).
_CLUSTER_ENV = ("MEGASCALE_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS", "OMPI_COMM_WORLD_SIZE", "SLURM_NTASKS")


def _cluster_detected() -> bool:
    if "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):  # a multi-host TPU slice
        return True
    for name in _CLUSTER_ENV:
        value = os.environ.get(name, "")
        if value and (not value.isdigit() or int(value) > 1):
            return True
    return False


def init_distributed(args) -> None:
    """jax.distributed.initialize() for multi-process runs; must run before JAX touches a device."""
    import jax

    explicit = (args.coordinator, args.num_processes, args.process_id)
    if any(x is not None for x in explicit):
        if any(x is None for x in explicit):
            raise UsageError("--coordinator, --num-processes and --process-id go together")
        if args.process_id >= args.num_processes:
            raise UsageError(f"--process-id {args.process_id} is not below --num-processes {args.num_processes}")
        if args.num_processes > 1:
            jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                       process_id=args.process_id)
    elif _cluster_detected():
        jax.distributed.initialize()


def _resolve(args):
    """Validates flags and inputs (no compilation): (cfg, mesh, data source, tokenizer or None)."""
    import jax

    from zoo import data, objectives
    from zoo.sharding import check_divisible, make_mesh

    overrides = {k: v for k, v in (("dtype", args.dtype), ("param_dtype", args.param_dtype),
                                   ("remat", args.remat)) if v is not None}
    cfg = load_model_config(args.model, overrides)
    objective = objectives.get(args.objective)
    if objective.families and cfg.family not in objective.families:
        raise UsageError(f"--objective {args.objective} trains {', '.join(objective.families)} models, not the "
                         f"{cfg.family} model {cfg.name!r}")
    missing = [f for f in objective.fields if f not in data.BATCH_FIELDS]
    if missing:  # labels / targets come from fine-tuning data, not from raw text
        raise UsageError(f"--objective {args.objective} needs {', '.join(missing)}, which pretraining on raw text "
                         "does not produce; fine-tune with --task classify or --task seq2seq")
    if args.seq_len > cfg.max_seq_len:
        raise UsageError(f"--seq-len {args.seq_len} exceeds max_seq_len={cfg.max_seq_len} of model {cfg.name!r}")
    if args.sample_tokens >= cfg.max_seq_len and args.data != ["synthetic"] and cfg.family in SAMPLED_FAMILIES:
        raise UsageError(f"--sample-tokens {args.sample_tokens} leaves no room for the prompt in the "
                         f"{cfg.max_seq_len} positions of model {cfg.name!r}")
    check_run_out(args)
    try:
        mesh = make_mesh(args.mesh)
        check_divisible(cfg, mesh)
    except ValueError as e:
        raise UsageError(str(e)) from None
    shards = mesh.shape["data"] * mesh.shape["fsdp"] * mesh.shape["expert"]
    if args.batch_size % args.grad_accum:
        raise UsageError(f"--grad-accum {args.grad_accum} does not divide --batch-size {args.batch_size}")
    micro = args.batch_size // args.grad_accum
    if micro % shards:
        raise UsageError(f"microbatch of {micro} rows does not split over the {shards} batch shards of "
                         f"--mesh {args.mesh} (data*fsdp*expert)")
    if args.batch_size % jax.process_count():
        raise UsageError(f"--batch-size {args.batch_size} does not split over {jax.process_count()} processes")
    if mesh.shape["sequence"] > 1 and args.seq_len % mesh.shape["sequence"]:
        raise UsageError(f"mesh axis sequence={mesh.shape['sequence']} does not divide --seq-len {args.seq_len}")

    if args.data == ["synthetic"]:
        vocab = _vocab_override(args.vocab_size, None)
        if vocab:
            cfg = cfg.replace(vocab_size=vocab)
        return cfg, mesh, None, None
    cap = args.data_max_bytes if args.data_max_bytes is not None else (
        data.STDLIB_MAX_BYTES if args.data == [data.STDLIB] else 0)
    try:
        source = data.DocumentSource(args.data, max_bytes=cap, split_bytes=args.split_bytes)
    except (FileNotFoundError, ImportError, data.DataError) as e:
        raise UsageError(str(e)) from None
    if len(source) < jax.process_count():
        raise UsageError(f"--data holds {len(source)} documents, fewer than the {jax.process_count()} processes")

    tokenizer = None
    tok_path = args.tokenizer or os.path.join(args.out, "tokenizer.model")
    if args.tokenizer and not os.path.isfile(args.tokenizer):
        raise UsageError(f"--tokenizer file does not exist: {args.tokenizer}")
    if os.path.isfile(tok_path):
        try:
            tokenizer = data.Tokenizer(tok_path)
        except Exception as e:  # sentencepiece/tokenizers raise assorted types on a bad file
            raise UsageError(f"cannot load tokenizer {tok_path}: {e}") from None
    vocab = _vocab_override(args.vocab_size, tokenizer)
    if vocab:
        cfg = cfg.replace(vocab_size=vocab)
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise UsageError(f"tokenizer {tok_path} has {tokenizer.vocab_size} tokens but model {cfg.name!r} has "
                         f"vocab_size={cfg.vocab_size}; pass --vocab-size tokenizer")
    _check_sample_fits(args, cfg, tokenizer)
    try:
        check_divisible(cfg, mesh)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return cfg, mesh, source, tokenizer


def check_run_out(args) -> None:
    """--out is new, empty, or a train.py run (which resumes): never another directory's files."""
    from zoo.paths import OutputError, check_writable_parent

    out = args.out
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out} is a file; pass a directory")
    if not os.path.isdir(out):
        try:
            check_writable_parent(out, flag="--out")
        except OutputError as e:
            raise UsageError(str(e)) from None
        return
    entries = sorted(e for e in os.listdir(out) if e != ".lock")
    saved_args = os.path.join(out, "args.json")
    if entries and not os.path.isfile(saved_args) and "checkpoints" not in entries:
        raise UsageError(f"--out {out} is not empty and holds no train.py run ({len(entries)} entries, e.g. "
                         f"{entries[0]!r}); pass a new or empty directory")
    if not os.access(out, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: cannot write in it (permission denied)")


def check_resume_flags(args, start: int) -> None:
    """A resume from checkpoint `start` with flags that change the run (against <out>/args.json)
    is refused, naming the flag and both values, unless --allow-flag-changes."""
    from zoo.paths import resolve

    saved_args = os.path.join(args.out, "args.json")
    if start >= args.steps or not os.path.isfile(saved_args):
        return  # a finished run only samples: no flag can change what it trained
    with open(saved_args) as f:
        saved = json.load(f)
    out = args.out
    if saved.get("task", "pretrain") != "pretrain":
        raise UsageError(f"--out {out} holds a --task {saved['task']} run; pretrain in another --out")

    def same(flag, old, new):
        if flag in ("data", "tokenizer", "model") and old is not None and new is not None:
            keep = lambda v: v if v in ("stdlib", "synthetic") or not (os.path.exists(v) or v.endswith(".json")) \
                else str(resolve(v))
            old = [keep(v) for v in old] if isinstance(old, list) else keep(old)
        return old == new

    changed = [(f, saved[f], getattr(args, f)) for f in RESUME_FLAGS if f in saved and not same(f, saved[f],
                                                                                            getattr(args, f))]
    if saved.get("decay_steps") and saved.get("decay_steps") == args.decay_steps:
        changed = [c for c in changed if c[0] != "steps"]  # a fixed schedule: a longer run only goes further
    if changed and not args.allow_flag_changes:
        flag, old, new = changed[0]
        more = f" (and {len(changed) - 1} more: {', '.join('--' + c[0].replace('_', '-') for c in changed[1:])})" \
            if len(changed) > 1 else ""
        raise UsageError(f"--{flag.replace('_', '-')} {_show(new)} differs from {_show(old)} in {saved_args}, the run "
                         f"being resumed{more}; pass the same value, another --out, or --allow-flag-changes")
    for flag, old, new in changed:
        print(f"resuming with --{flag.replace('_', '-')} {_show(new)} instead of {_show(old)} (--allow-flag-changes)")


def _show(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def _vocab_override(value, tokenizer) -> int | None:
    if value is None:
        return None
    if value == "tokenizer":
        if tokenizer is None:
            raise UsageError("--vocab-size tokenizer needs --tokenizer (or a tokenizer already in --out)")
        return -(-tokenizer.vocab_size // 128) * 128
    try:
        vocab = int(value)
    except ValueError:
        raise UsageError(f"--vocab-size: expected a positive integer or 'tokenizer', got {value!r}") from None
    if vocab <= 0:
        raise UsageError(f"--vocab-size: expected a positive integer or 'tokenizer', got {value!r}")
    return vocab


def sample(model, params, tokenizer, prompt: str, *, max_new_tokens: int, temperature: float, seed: int) -> str:
    """Text continuing `prompt`, sampled with zoo.generate (KV cache) from the trained params."""
    import jax
    import jax.numpy as jnp

    import zoo

    ids = tokenizer.encode(prompt) or [tokenizer.eos_id or 0]
    host_params = jax.device_get(params)  # sampling is a demo: one device, no mesh
    # Only ids the tokenizer can decode: the model's vocabulary may be padded past it.
    new = zoo.generate(model, host_params, jnp.asarray([ids], jnp.int32), max_new_tokens=max_new_tokens,
                       temperature=temperature, top_k=40 if temperature > 0 else None, seed=seed,
                       vocab_limit=tokenizer.vocab_size)
    new = [int(t) for t in jax.device_get(new)[0]]
    if tokenizer.eos_id is not None and tokenizer.eos_id in new:
        new = new[: new.index(tokenizer.eos_id)]
    return prompt + tokenizer.decode(new)


def main(argv: list[str] | None = None) -> dict | int:
    """Runs training; returns a summary dict, or an exit status: 2 for bad flags or inputs
    (one line on stderr, before compiling), 3 when too many non-finite steps stopped the run."""
    t0 = time.time()
    try:
        args = build_parser().parse_args(argv)
        if args.lr is None:
            args.lr = DEFAULT_LR[args.task]
        resolve_paths(args)
        init_distributed(args)
        if args.compile_only:
            from benchmarks import plan

            return plan.compile_only(args)
        if args.task != "pretrain":
            from zoo import finetune

            return finetune.run(args)
        cfg, mesh, source, tokenizer = _resolve(args)
        summary = _train(args, cfg, mesh, source, tokenizer)
    except UsageError as e:
        return _die(str(e))
    except NonFiniteStop as e:
        return _die(str(e), status=3)
    except KeyboardInterrupt:  # Ctrl-C before the first step: nothing to save yet
        return _die("interrupted (Ctrl-C) before training started; nothing was saved", status=130)
    summary["wall_s"] = time.time() - t0
    if jax_process_index() == 0:
        print(f"done in {summary['wall_s']:.0f}s; run directory {args.out}")
    return INTERRUPTED if summary.get("stopped") == "sigint" else summary


# Families whose run ends with a sample of text (decoders).
SAMPLED_FAMILIES = ("llama", "gpt2", "moe")
# Exit status after Ctrl-C (128 + SIGINT, the shell's convention): the run checkpointed and stopped.
INTERRUPTED = 130
# Flags that change what a resumed run computes (schedule, data order, batch shapes, loss):
# a resume with other values is refused unless --allow-flag-changes says it is meant.
# (--steps may change when --decay-steps fixes the schedule.)
RESUME_FLAGS = ("model", "data", "tokenizer", "vocab_size", "objective", "steps", "decay_steps", "lr", "warmup_steps",
                "min_lr_ratio", "weight_decay", "b1", "b2", "eps", "clip_norm", "seq_len", "batch_size", "seed",
                "z_loss", "split_bytes", "data_max_bytes", "shuffle_window")
# Values that name files: made absolute once, here, so no code below sees a relative path
# (orbax reads a relative checkpoint path differently) and args.json stays valid from any cwd.
PATH_FLAGS = ("out", "tokenizer", "init")


def resolve_paths(args) -> None:
    """Makes every path flag absolute (and fills fine-tuning's default --out)."""
    from zoo import data
    from zoo.paths import resolve

    if getattr(args, "task", "pretrain") != "pretrain" and args.out == DEFAULT_OUT:
        args.out = os.path.join("runs", args.task)
    for flag in PATH_FLAGS:
        if getattr(args, flag, None):
            setattr(args, flag, str(resolve(getattr(args, flag))))
    keywords = (data.STDLIB, "synthetic")
    args.data = [d if d in keywords else str(resolve(d)) for d in args.data]
    if getattr(args, "eval_data", None):
        args.eval_data = [str(resolve(d)) for d in args.eval_data]
    if os.path.exists(args.model) or args.model.endswith(".json"):
        args.model = str(resolve(args.model))


class NonFiniteStop(Exception):
    """Too many consecutive non-finite steps: the run saved its last good state and stopped."""


def jax_process_index() -> int:
    import jax

    return jax.process_index()


class StopRequest:
    """SIGTERM (preemption) and Ctrl-C (SIGINT) set a flag the loop polls between steps: the
    run finishes its step, checkpoints and stops. A second Ctrl-C aborts at once (the newest
    complete checkpoint stays usable). With several processes they agree: any one signalled
    stops them all at the same step."""

    def __init__(self):
        import signal

        self.signal = None  # "sigterm" or "sigint" once one arrived
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        import signal

        if signum == signal.SIGINT:
            if self.signal == "sigint":
                print("\ntrain.py: second Ctrl-C: aborted without saving; the newest complete checkpoint is kept",
                      file=sys.stderr, flush=True)
                os._exit(INTERRUPTED)
            print("\ntrain.py: Ctrl-C: finishing this step and saving a checkpoint (Ctrl-C again to abort at once)",
                  file=sys.stderr, flush=True)
        self.signal = self.signal or ("sigint" if signum == signal.SIGINT else "sigterm")

    @property
    def signalled(self) -> bool:
        return self.signal is not None

    def requested(self) -> str | None:
        """The signal that stops the run ("sigterm" / "sigint"), agreed by all processes, or None."""
        import jax
        import numpy as np

        if jax.process_count() == 1:
            return self.signal
        from jax.experimental import multihost_utils

        code = {None: 0, "sigterm": 1, "sigint": 2}[self.signal]
        agreed = int(multihost_utils.process_allgather(np.int32(code)).max())
        return {0: None, 1: "sigterm", 2: "sigint"}[agreed]

    def close(self) -> None:
        import signal

        for s, handler in self._previous.items():
            signal.signal(s, handler)


def _barrier(name: str) -> None:
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _train_tokenizer(args, cfg, source):
    """Process 0 trains the run's tokenizer into <out>/tokenizer.model; a corpus it cannot be
    trained on is a UsageError (one line), and nothing is left behind."""
    from zoo import data

    path = os.path.join(args.out, "tokenizer.model")
    t0 = time.time()
    try:
        tokenizer = data.train_tokenizer(source, path, vocab_size=cfg.vocab_size)
    except RuntimeError as e:  # sentencepiece: too little text for the vocabulary, and the like
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise UsageError(f"--data: cannot train a {cfg.vocab_size}-token tokenizer on {len(source)} documents "
                         f"({reason}); pass more text or --tokenizer FILE") from None
    print(f"trained a {tokenizer.vocab_size}-token sentencepiece BPE tokenizer on {len(source)} documents "
          f"in {time.time() - t0:.1f}s -> {path}")
    return tokenizer


def _prepare_run_dir(args, cfg, source, tokenizer, resumed: bool):
    """The tokenizer (trained by process 0 when missing) and args.json (rewritten only while no
    checkpoint exists, or when --allow-flag-changes accepted new values)."""
    import jax

    from zoo import data

    primary = jax.process_index() == 0
    if source is not None and tokenizer is None:
        if primary:
            tokenizer = _train_tokenizer(args, cfg, source)
        _barrier("tokenizer")
        if not primary:
            tokenizer = data.Tokenizer(os.path.join(args.out, "tokenizer.model"))
    _check_sample_fits(args, cfg, tokenizer)
    args_path = os.path.join(args.out, "args.json")
    if primary and (not resumed or args.allow_flag_changes or not os.path.exists(args_path)):
        with open(args_path, "w") as f:
            json.dump(vars(args), f, indent=1)
        # The resolved config (and tokenizer) beside the checkpoints: `python -m zoo` reads them.
        from zoo.evaluate import write_run_metadata

        write_run_metadata(args.out, cfg, tokenizer)
    return tokenizer


def _check_sample_fits(args, cfg, tokenizer) -> None:
    """The final sample needs its prompt plus --sample-tokens within the model's positions:
    checked before the first step, not found out at the end of the run."""
    if not args.sample_tokens or tokenizer is None or cfg.family not in SAMPLED_FAMILIES:
        return
    prompt = len(tokenizer.encode(args.sample_prompt)) or 1
    if prompt + args.sample_tokens > cfg.max_seq_len:
        raise UsageError(f"--sample-prompt ({prompt} tokens) + --sample-tokens {args.sample_tokens} exceed the "
                         f"{cfg.max_seq_len} positions of model {cfg.name!r}; lower --sample-tokens")


@contextlib.contextmanager
def _run_dir(out: str, primary: bool):
    """Holds the run directory's lock (process 0) while the run writes it. If the run fails
    before writing anything but the lock, the lock file (and the dir, if this run made it)
    go again: a refused run leaves --out as it found it."""
    from zoo.paths import OutputError, RunLock

    existed = os.path.isdir(out)
    before = set(os.listdir(out)) if existed else set()
    try:
        lock = RunLock(out) if primary else None
    except OutputError as e:
        raise UsageError(str(e)) from None
    try:
        yield
    except BaseException:
        if lock is not None and RunLock.NAME not in before and set(os.listdir(out)) - before <= {RunLock.NAME}:
            lock.release()
            with contextlib.suppress(OSError):
                os.remove(os.path.join(out, RunLock.NAME))
                if not existed:
                    os.rmdir(out)
        raise
    finally:
        if lock is not None:
            lock.release()


def _remove_incomplete_saves(ckpt_dir: str) -> None:
    """Temporary dirs of saves a killed run never finished: ours, useless, and in the way."""
    import glob
    import shutil

    stale = sorted(glob.glob(os.path.join(ckpt_dir, "*.orbax-checkpoint-tmp*")))
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    if stale:
        print(f"removed {len(stale)} incomplete checkpoint save(s) left by an interrupted run: "
              f"{', '.join(os.path.basename(p) for p in stale)}")


def _train(args, cfg, mesh, source, tokenizer) -> dict:
    import jax

    primary = jax.process_index() == 0
    with _run_dir(args.out, primary):
        return _train_locked(args, cfg, mesh, source, tokenizer)


def _train_locked(args, cfg, mesh, source, tokenizer) -> dict:
    import jax
    from flax import linen as nn
    from tqdm import tqdm

    import zoo
    from zoo import data
    from zoo.checkpoint import Checkpointer, CheckpointMismatch
    from zoo.objectives import get as get_objective

    primary = jax.process_index() == 0
    ckpt_dir = os.path.join(args.out, "checkpoints")
    if primary and os.path.isdir(ckpt_dir):
        _remove_incomplete_saves(ckpt_dir)
    _barrier("stale-saves")
    start = None
    if os.path.isdir(ckpt_dir):  # another model's checkpoint is refused before anything is written or compiled
        ckpt = Checkpointer(ckpt_dir, keep=args.keep_checkpoints)
        start = ckpt.latest_step()
        if start is not None:
            try:
                ckpt.check_compatible(start, {"params": nn.unbox(zoo.abstract_params(cfg, args.seq_len))})
            except CheckpointMismatch as e:
                raise UsageError(f"{e}; use another --out") from None
            finally:
                ckpt.close()
            check_resume_flags(args, start)
        else:
            ckpt.close()
    tokenizer = _prepare_run_dir(args, cfg, source, tokenizer, resumed=start is not None)
    ckpt = Checkpointer(ckpt_dir, keep=args.keep_checkpoints)

    opt = OptimConfig(lr=args.lr, warmup_steps=args.warmup_steps, decay_steps=args.decay_steps or args.steps,
                      min_lr_ratio=args.min_lr_ratio, weight_decay=args.weight_decay, b1=args.b1, b2=args.b2,
                      eps=args.eps, clip_norm=args.clip_norm)
    local_batch = args.batch_size // jax.process_count()
    if source is None:
        data_it = data.SyntheticIterator(vocab_size=cfg.vocab_size, seq_len=args.seq_len, batch_size=local_batch,
                                         seed=args.seed, process_index=jax.process_index())
    else:
        data_it = data.DataIterator(data.text_dataset(
            source, tokenizer, seq_len=args.seq_len, batch_size=local_batch, seed=args.seed,
            process_index=jax.process_index(), process_count=jax.process_count(), shuffle_window=args.shuffle_window))

    t0 = time.time()
    trainer = make_trainer(cfg, mesh, opt, objective=args.objective, batch_size=args.batch_size,
                           seq_len=args.seq_len, grad_accum=args.grad_accum, z_loss=args.z_loss)
    compile_s = time.time() - t0
    if start is None:
        state = init_state(trainer, mesh, args.seed)
        start = 0
    else:
        try:
            state, data_state = ckpt.restore(start, trainer.abstract_state)
        except CheckpointMismatch as e:
            ckpt.close()
            raise UsageError(str(e)) from None
        data_it.set_state(data_state)
        if primary:
            print(f"resuming {args.out} from its checkpoint at step {start}")
    n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    peak, peak_src = peak_flops_per_device(args.peak_flops)
    flops_per_token = cfg.flops_per_token(args.seq_len)
    if primary:
        print(f"model {cfg.name}: {n_params / 1e6:.2f}M params, mesh {dict(mesh.shape)}, {jax.device_count()} "
              f"devices in {jax.process_count()} process(es), step compiled in {compile_s:.1f}s; "
              f"MFU peak {peak:.3g} FLOP/s/device ({peak_src})")

    # A resumed run's log restarts at its checkpoint: records of steps the killed run took
    # after it are dropped (they are retrained), in metrics.jsonl and TensorBoard alike.
    log = MetricsLog(args.out, resume_step=start) if primary else None
    losses: list[float] = []
    nonfinite_run = 0  # consecutive non-finite steps

    fields = get_objective(args.objective).fields

    def to_global(batch):  # this process's rows -> one global array per field
        return {k: jax.make_array_from_process_local_data(trainer.batch_sharding, batch[k]) for k in fields}

    bar = tqdm(total=args.steps, initial=min(start, args.steps), disable=args.no_progress or not primary,
               unit="step", dynamic_ncols=True)
    last_time = time.time()
    pending = None  # (step, metrics on device): read while the next batch is already prepared

    def flush(item):
        nonlocal last_time, nonfinite_run
        step, metrics = item
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}  # waits for that step to finish
        now = time.time()
        tps = m["tokens"] / max(now - last_time, 1e-9)
        last_time = now
        record = {"step": step, "loss": m["loss"], "learning_rate": m["learning_rate"], "grad_norm": m["grad_norm"],
                  "tokens_per_second": tps, "mfu": flops_per_token * tps / (jax.device_count() * peak)}
        record.update({k: v for k, v in m.items() if k not in record})
        if log is not None and (step % args.log_every == 0 or step == args.steps):
            log.write(record)
        losses.append(m["loss"])
        nonfinite_run = nonfinite_run + 1 if m["nonfinite"] else 0
        bar.set_postfix(loss=f"{m['loss']:.3f}", tok_s=f"{tps:,.0f}")
        bar.update(1)
        return step

    if start >= args.steps and primary:
        print(f"{args.out} already holds a checkpoint at step {start} >= --steps {args.steps}: nothing to train "
              "(pass --out DIR for a fresh run, or a larger --steps)")
    stop = StopRequest()
    stopped = None  # why the loop ended early
    saved_step = start if start else None  # the step of the newest checkpoint on disk
    try:
        with mesh_context(mesh):
            for step in range(start, args.steps):
                # The next batch is read and sent while step-1 still runs; then step-1's metrics
                # decide whether to go on, so --max-nonfinite N stops after exactly N bad steps.
                data_state = data_it.get_state()  # before this batch: a stop here resumes with it
                batch = to_global(next(data_it))
                if pending is not None:
                    flush(pending)
                    pending = None
                if nonfinite_run >= args.max_nonfinite:
                    stopped = "nonfinite"
                else:
                    stopped = stop.requested()
                if stopped:
                    # Params are unchanged by non-finite steps: this is the last good state.
                    if saved_step != step:
                        ckpt.save(step, state, data_state)
                    break
                state, metrics = trainer.step(state, batch)
                pending = (step + 1, metrics)
                if (step + 1) % args.checkpoint_every == 0 or step + 1 == args.steps:
                    ckpt.save(step + 1, state, data_it.get_state())
                    saved_step = step + 1
            if pending is not None:
                flush(pending)
    finally:  # let a save in flight finish, so the next run resumes from it
        stop.close()
        bar.close()
        ckpt.close()
    history = log.history() if log is not None else []
    if log is not None:
        log.close()
    if history:
        plot_loss(history, os.path.join(args.out, "loss.png"))
    last = int(jax.device_get(state["step"]))
    if stopped == "nonfinite":
        raise NonFiniteStop(f"{nonfinite_run} steps in a row had a non-finite loss or gradient norm (the last at "
                            f"step {last}); their updates were skipped and the last good params are checkpointed at "
                            f"step {last} in {args.out}. Lower --lr or check the data, then rerun to resume.")
    if stopped in ("sigterm", "sigint") and primary:
        print(f"{'SIGTERM' if stopped == 'sigterm' else 'Ctrl-C'}: checkpoint saved at step {last}; rerun the same "
              "command to resume")
    summary = {"start_step": start, "steps": args.steps, "last_step": last, "losses": losses, "out": args.out,
               "stopped": stopped}
    if history and primary:
        print(f"loss {history[0]['loss']:.3f} (step {history[0]['step']}) -> {history[-1]['loss']:.3f} "
              f"(step {history[-1]['step']}); metrics in {log.path}")
    # Sampling is a one-device demo; with several processes the params are not all on this host.
    if (not stopped and jax.process_count() == 1 and args.sample_tokens and tokenizer is not None
            and cfg.family in SAMPLED_FAMILIES):
        text = sample(trainer.model, state["params"], tokenizer, args.sample_prompt,
                      max_new_tokens=args.sample_tokens, temperature=args.temperature, seed=args.seed)
        summary["sample"] = text
        print("---- sample " + "-" * 60)
        print(text)
        print("-" * 72)
    return summary


if __name__ == "__main__":
    result = main()
    sys.exit(result if isinstance(result, int) else 0)
