"""The typed run configuration: one frozen dataclass whose fields ARE train.py's flags.

Each field carries its flag's help, type and group in its metadata; `build_parser()`
makes the argparse parser from them, `TrainConfig.from_args(argv)` parses, fills the
defaults that depend on other flags, makes every path absolute and validates once, and
`TrainConfig.from_json` reads a run's args.json back. Nothing below this module sees an
argparse Namespace.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field, fields

from kernels import IMPLEMENTATIONS
from kernels.api import CONTEXT_PARALLEL
from zoo import data as zoo_data
from zoo import registry
from zoo.argtypes import host_port, non_negative_float, non_negative_int, positive_int
from zoo.configs import DTYPES, REMAT_POLICIES, parse_overrides
from zoo.objectives import OBJECTIVES
from zoo.paths import resolve
from zoo.training.optimizer import OptimConfig

DEFAULT_OUT = os.path.join("runs", "default")
DEFAULT_PROMPT = "def "
TASKS = ("pretrain", "classify", "seq2seq")
# Peak learning rate per --task: from-scratch pretraining of small models takes a large
# one; fine-tuning a trained checkpoint needs a small one (BERT's 2e-5..5e-5, T5's 1e-4..1e-3).
DEFAULT_LR = {"pretrain": 5e-3, "classify": 5e-5, "seq2seq": 3e-4}
# Values that name files: made absolute once, in from_args, so no code below sees a relative
# path (orbax reads a relative checkpoint path differently) and args.json stays valid from any cwd.
PATH_FLAGS = ("out", "tokenizer", "init")

GROUPS = {
    "model": "model",
    "data": "data",
    "optim": "optimisation",
    "run": "run",
    "eval": "held-out evaluation (pretraining and fine-tuning)",
    "dist": "multi-host (jax.distributed; auto-detected on TPU pods, Slurm and Open MPI)",
    "finetune": "fine-tuning (--task classify | seq2seq; also uses --data, --out, --batch-size, --seq-len, --lr and "
                "the optimisation flags; --steps is not used)",
    "plan": "planning (AOT compile, no hardware needed; see benchmarks/plan.py)",
}


class UsageError(Exception):
    """A bad flag or input: reported as one line, exit status 2, before compiling."""


def flag(group: str, default, help: str, **argparse_kwargs):
    """A dataclass field that is also a command-line flag (list defaults are copied per instance)."""
    meta = dict(group=group, help=help, **argparse_kwargs)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class TrainConfig:
    """Every train.py flag with its default; `python train.py --help` lists them by group."""

    # model
    model: str = flag("model", "small-llama", "a preset name (see zoo.list_models()) or an HF config.json / model "
                                              "dir, trained from scratch")
    dtype: str | None = flag("model", None, "compute dtype (default: the model config's)", choices=DTYPES)
    param_dtype: str | None = flag("model", None, "master weight and optimizer dtype (default: the model config's)",
                                   choices=DTYPES)
    remat: str | None = flag("model", None, "activation checkpointing policy per layer (default: the model config's)",
                             choices=REMAT_POLICIES)
    attention_impl: str | None = flag("model", None, "attention implementation (kernels.attention): pallas "
                                      "(our kernel: Mosaic TPU / Mosaic GPU sm90+), pallas_triton (pre-Hopper GPUs), "
                                      "cudnn, xla. "
                                      "Default: the model config's (none: the best for the platform)",
                                      choices=IMPLEMENTATIONS)
    context_parallel: str | None = flag("model", None, "context parallelism over the mesh's context axis (--mesh "
                                        "context=N): allgather (k, v gathered; default) or ring (k/v blocks passed "
                                        "around the ring, merged by log-sum-exp)",
                                        choices=CONTEXT_PARALLEL)
    vocab_size: str | None = flag("model", None, "override the model's vocab_size: a number, or 'tokenizer' (the "
                                  "tokenizer's size rounded up to a multiple of 128). Default: the model's; a larger "
                                  "tokenizer is an error")
    override: list = flag("model", [], "model config fields, FIELD=VALUE each (e.g. num_mtp_layers=1 "
                          "bias_update_rate=0.01 for DeepSeek); values take the field's type, JSON for lists",
                          nargs="+")
    # data
    data: list = flag("data", [zoo_data.STDLIB], "text / JSONL ('text' field) / ArrayRecord files or directories; "
                      "'stdlib' is the Python standard library's sources; 'synthetic' is random tokens", nargs="+")
    data_max_bytes: int | None = flag("data", None, "index at most this many bytes of the corpus (0: all; default: "
                                      "0, or 3 MB for stdlib)", type=non_negative_int)
    split_bytes: int = flag("data", 2048, "cut text files longer than this at line ends into documents of at most "
                            "this size (0: whole files; JSONL/ArrayRecord records are never cut)",
                            type=non_negative_int)
    shuffle_window: int = flag("data", 128, "packed rows shuffled within a window of this many rows (0 or 1: off)",
                               type=non_negative_int)
    tokenizer: str | None = flag("data", None, "sentencepiece .model or HF tokenizer.json; default: "
                                 "<out>/tokenizer.model, trained on the corpus (BPE, the model's vocab size) if "
                                 "missing")
    seq_len: int = flag("data", 256, "tokens per packed row", type=positive_int)
    batch_size: int = flag("data", 8, "global batch size in rows", type=positive_int)
    objective: str | None = flag("data", None, "training objective (default: the model family's pretraining "
                                 "objective: clm for decoders, mlm for BERT/RoBERTa, span for T5)",
                                 choices=lambda: sorted(OBJECTIVES))  # read per parse
    # optimisation
    steps: int = flag("optim", 200, "total optimizer steps", type=positive_int)
    lr: float | None = flag("optim", None, "peak learning rate (default: 5e-3 for pretraining; fine-tuning a trained "
                            "checkpoint: 5e-5 with --task classify, 3e-4 with --task seq2seq)",
                            type=non_negative_float)
    warmup_steps: int = flag("optim", 10, "linear warmup steps", type=non_negative_int)
    decay_steps: int | None = flag("optim", None, "length of warmup + cosine decay (default: --steps)",
                                   type=positive_int)
    min_lr_ratio: float = flag("optim", 0.1, "final lr / peak lr", type=non_negative_float)
    weight_decay: float = flag("optim", 0.1, "AdamW decoupled weight decay (not on norms and biases)",
                               type=non_negative_float)
    b1: float = flag("optim", 0.9, "Adam beta1 (decay of the gradient mean)", type=non_negative_float)
    b2: float = flag("optim", 0.95, "Adam beta2 (decay of the squared-gradient mean)", type=non_negative_float)
    eps: float = flag("optim", 1e-8, "Adam epsilon (added to the root of the squared-gradient mean)",
                      type=non_negative_float)
    clip_norm: float = flag("optim", 1.0, "global gradient norm clip (0: off)", type=non_negative_float)
    grad_accum: int = flag("optim", 1, "microbatches per step (a lax.scan inside the step); divides --batch-size",
                           type=positive_int)
    z_loss: float = flag("optim", 0.0, "weight of the logsumexp^2 auxiliary loss", type=non_negative_float)
    # run
    mesh: str = flag("run", "fsdp=-1", "mesh axis sizes, e.g. data=2,fsdp=-1,tensor=1 (-1 fills the rest; axes: "
                     "data, fsdp, context, tensor, expert; context splits each row's length, 'sequence' is its old "
                     "name); dcn_AXIS=N spreads an axis over N slices (multi-slice, "
                     "e.g. dcn_data=2,fsdp=-1: only that axis's collectives cross the data-center network)")
    seed: int = flag("run", 0, "seed of init, data order and sampling", type=int)
    out: str = flag("run", DEFAULT_OUT, "run directory: new, empty, or a train.py run to resume (it resumes when it "
                    "holds checkpoints; one process writes it at a time)")
    allow_flag_changes: bool = flag("run", False, "resume even though flags that change the run (--steps, --lr, "
                                    "--seq-len, --batch-size, --data, ...) differ from the ones in <out>/args.json, "
                                    "and record the new ones there")
    checkpoint_every: int = flag("run", 100, "save every N steps (and at the end)", type=positive_int)
    keep_checkpoints: int = flag("run", 3, "checkpoints kept (the newest)", type=positive_int)
    log_every: int = flag("run", 1, "write metrics every N steps", type=positive_int)
    peak_flops: float | None = flag("run", None, "peak FLOP/s per device for MFU (default: the table in "
                                    "zoo/training/metrics.py, or measured on CPU)", type=non_negative_float)
    sample_tokens: int = flag("run", 200, "tokens to sample from the trained model at the end (0: none)",
                              type=non_negative_int)
    sample_prompt: str = flag("run", DEFAULT_PROMPT, "prompt of the final sample")
    temperature: float = flag("run", 0.7, "sampling temperature (0: greedy)", type=non_negative_float)
    no_progress: bool = flag("run", False, "no tqdm progress bar")
    max_nonfinite: int = flag("run", 10, "a step whose loss or gradient norm is not finite leaves the params "
                              "unchanged (counted in metrics as 'nonfinite'); after this many in a row the run saves "
                              "the last good state and stops with exit status 3", type=positive_int)
    # held-out evaluation
    eval_data: list | None = flag("eval", None, "held-out data scored every --eval-every steps: text files like "
                                  "--data when pretraining (eval loss and perplexity), JSONL with --data's fields "
                                  "when fine-tuning", nargs="+", metavar="PATH")
    eval_every: int | None = flag("eval", None, "steps between evaluations of --eval-data (default: "
                                  "--checkpoint-every when pretraining, one epoch when fine-tuning)",
                                  type=positive_int)
    # multi-host
    coordinator: str | None = flag("dist", None, "HOST:PORT of process 0's coordinator; with --num-processes and "
                                   "--process-id, for clusters JAX cannot detect (every process runs the same command "
                                   "with its own --process-id)", type=host_port)
    num_processes: int | None = flag("dist", None, "processes in the job (with --coordinator)", type=positive_int)
    process_id: int | None = flag("dist", None, "this process's index, 0..num-processes-1 (with --coordinator)",
                                  type=non_negative_int)
    # fine-tuning
    task: str = flag("finetune", "pretrain", "pretrain (the objective on raw text), classify (JSONL fields text, "
                     "label; BERT) or seq2seq (JSONL fields input, target; T5)", choices=TASKS)
    init: str | None = flag("finetune", None, "weights to fine-tune: an HF checkpoint dir or a zoo run dir, with its "
                            "tokenizer (default: --model from scratch, which then needs --tokenizer)", metavar="DIR")
    epochs: int = flag("finetune", 3, "passes over --data when fine-tuning", type=positive_int)
    num_labels: int | None = flag("finetune", None, "classify: number of classes (default: the checkpoint's "
                                  "classifier, or the largest label + 1 for a fresh head; a different number gets a "
                                  "fresh head)", type=positive_int)
    eval_max_new_tokens: int | None = flag("finetune", None, "seq2seq: output tokens generated per eval example "
                                           "(default: the longest eval target)", type=positive_int)
    # planning
    compile_only: bool = flag("plan", False, "compile the train step for --topology (or this host's devices) and "
                              "report per-device memory against capacity, FLOPs and whether it fits; nothing is "
                              "trained or written")
    topology: str | None = flag("plan", None, "TPU topology to compile for through libtpu, e.g. v5p:2x2x1 (= v5p-8), "
                                "v5e:4x4, v6e:2x2, 2xv5p-8 (two slices); implies --compile-only")

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_args(cls, argv: list[str] | None = None, *, description: str = "", epilog: str = "") -> TrainConfig:
        """Parses flags (UsageError on a bad one), fills derived defaults, resolves paths, validates."""
        ns = build_parser(description=description, epilog=epilog).parse_args(argv)
        return cls(**vars(ns)).finish()

    @classmethod
    def from_json(cls, blob: dict) -> TrainConfig:
        """A config from a run's args.json (unknown keys, from older runs, are ignored)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in blob.items() if k in known})

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def with_model_objective(self, cfg) -> TrainConfig:
        """--objective as given, or the pretraining objective of `cfg`'s family (zoo.registry)."""
        if self.objective is not None:
            return self
        return self.replace(objective=registry.of(cfg).objectives[0])

    def finish(self) -> TrainConfig:
        """Derived defaults (lr per task, fine-tuning's --out, --topology => --compile-only), absolute
        paths, and the checks between flags. Idempotent."""
        changes: dict = {}
        if self.lr is None:
            changes["lr"] = DEFAULT_LR[self.task]
        if self.topology:
            changes["compile_only"] = True
        out = self.out
        if self.task != "pretrain" and out == DEFAULT_OUT:
            out = os.path.join("runs", self.task)
        changes["out"] = out
        for name in PATH_FLAGS[1:]:
            if getattr(self, name):
                changes[name] = str(resolve(getattr(self, name)))
        changes["out"] = str(resolve(out))
        keywords = (zoo_data.STDLIB, "synthetic")
        changes["data"] = [d if d in keywords else str(resolve(d)) for d in self.data]
        if self.eval_data:
            changes["eval_data"] = [str(resolve(d)) for d in self.eval_data]
        if os.path.exists(self.model) or self.model.endswith(".json"):
            changes["model"] = str(resolve(self.model))
        cfg = dataclasses.replace(self, **changes)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Checks between flags that need no file and no device."""
        explicit = (self.coordinator, self.num_processes, self.process_id)
        if any(x is not None for x in explicit):
            if any(x is None for x in explicit):
                raise UsageError("--coordinator, --num-processes and --process-id go together")
            if self.process_id >= self.num_processes:
                raise UsageError(f"--process-id {self.process_id} is not below --num-processes {self.num_processes}")
        if self.batch_size % self.grad_accum:
            raise UsageError(f"--grad-accum {self.grad_accum} does not divide --batch-size {self.batch_size}")

    # ------------------------------------------------------------------ views

    def model_overrides(self) -> dict:
        """--override FIELD=VALUE (values still text: `pretrain.with_overrides` types them) and --dtype /
        --param-dtype / --remat / --attention-impl / --context-parallel, as ModelConfig field overrides."""
        try:
            out = parse_overrides(self.override)
        except ValueError as e:
            raise UsageError(str(e)) from None
        out.update({k: v for k, v in (("dtype", self.dtype), ("param_dtype", self.param_dtype),
                                      ("remat", self.remat), ("attention_impl", self.attention_impl),
                                      ("context_parallel", self.context_parallel)) if v is not None})
        return out

    def optim(self, total_steps: int | None = None) -> OptimConfig:
        """The optimizer flags; the schedule spans --decay-steps, else `total_steps` (default --steps)."""
        return OptimConfig(lr=self.lr, warmup_steps=self.warmup_steps,
                           decay_steps=self.decay_steps or total_steps or self.steps, min_lr_ratio=self.min_lr_ratio,
                           weight_decay=self.weight_decay, b1=self.b1, b2=self.b2, eps=self.eps,
                           clip_norm=self.clip_norm)


# ---------------------------------------------------------------------------- the parser


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + error
        raise UsageError(message)


class _DefaultsFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" where a flag has a default of its own (None defers to the model config)."""

    def _get_help_string(self, action):
        if action.default in (None, False, argparse.SUPPRESS) or "default" in (action.help or ""):
            return action.help
        shown = " ".join(map(str, action.default)) if isinstance(action.default, list) else action.default
        return f"{action.help} (default: {shown})"


def build_parser(*, description: str = "", epilog: str = "", prog: str = "train.py") -> argparse.ArgumentParser:
    """The argparse parser of TrainConfig's fields, grouped, with each default in --help."""
    p = _Parser(prog=prog, description=description, epilog=epilog, formatter_class=_DefaultsFormatter)
    groups = {key: p.add_argument_group(title) for key, title in GROUPS.items()}
    for f in fields(TrainConfig):
        meta = dict(f.metadata)
        group = groups[meta.pop("group")]
        if callable(meta.get("choices")):
            meta["choices"] = meta["choices"]()
        name = "--" + f.name.replace("_", "-")
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if default is False:
            group.add_argument(name, action="store_true", help=meta["help"])
        else:
            group.add_argument(name, default=default, **meta)
    return p
