"""The run directory: what may be written where, the lock, resuming, args.json.

--out is new, empty, or a train.py run of the same task (which resumes); nothing else's
files are ever touched. One process writes a run at a time (<out>/.lock).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil

import jax
from flax import linen as nn

import zoo
from zoo import multihost
from zoo.checkpoint import Checkpointer, CheckpointMismatch
from zoo.paths import OutputError, RunLock, check_writable_parent, resolve
from zoo.pretrained import write_run_metadata
from zoo.training.config import TrainConfig, UsageError

# Flags that change what a resumed run computes (schedule, data order, batch shapes, loss):
# a resume with other values is refused unless --allow-flag-changes says it is meant.
# (--steps may change when --decay-steps fixes the schedule.)
RESUME_FLAGS = ("task", "model", "override", "init", "data", "tokenizer", "vocab_size", "objective", "steps",
                "decay_steps", "lr", "warmup_steps", "min_lr_ratio", "weight_decay", "b1", "b2", "eps", "clip_norm",
                "seq_len", "batch_size", "seed", "z_loss", "split_bytes", "data_max_bytes", "shuffle_window", "epochs",
                "num_labels", "grad_accum")
ARGS_FILE = "args.json"


def check_run_out(config: TrainConfig, sources: tuple = ()) -> None:
    """--out is new, empty, or a train.py run (which resumes): never another directory's files,
    and never inside or around a source it reads (`sources`, e.g. --init)."""
    out = config.out
    real = os.path.realpath(out)
    for src in filter(None, sources):
        src_real = os.path.realpath(src)
        if os.path.commonpath([real, src_real]) in (real, src_real):
            raise UsageError(f"--out {out} is or overlaps the source {src}; write to a new directory")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out} is a file; pass a directory")
    if not os.path.isdir(out):
        try:
            check_writable_parent(out, flag="--out")
        except OutputError as e:
            raise UsageError(str(e)) from None
        return
    entries = sorted(e for e in os.listdir(out) if e != RunLock.NAME)
    if entries and not os.path.isfile(os.path.join(out, ARGS_FILE)) and "checkpoints" not in entries:
        raise UsageError(f"--out {out} is not empty and holds no train.py run ({len(entries)} entries, e.g. "
                         f"{entries[0]!r}); pass a new or empty directory")
    if not os.access(out, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: cannot write in it (permission denied)")


def _show(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def check_resume_flags(config: TrainConfig, start: int, total_steps: int) -> None:
    """A resume from checkpoint `start` with flags that change the run (against <out>/args.json)
    is refused, naming the flag and both values, unless --allow-flag-changes."""
    saved_args = os.path.join(config.out, ARGS_FILE)
    if not os.path.isfile(saved_args):
        return
    with open(saved_args) as f:
        saved = json.load(f)
    if saved.get("task", "pretrain") != config.task:
        raise UsageError(f"--out {config.out} holds a --task {saved.get('task', 'pretrain')} run; train "
                         f"--task {config.task} in another --out")
    if start >= total_steps:
        return  # a finished run only samples: no flag can change what it trained

    def same(name, old, new):
        if name in ("data", "tokenizer", "model", "init") and old is not None and new is not None:
            def keep(v):
                named = v not in ("stdlib", "synthetic") and (os.path.exists(v) or v.endswith(".json"))
                return str(resolve(v)) if named else v
            old = [keep(v) for v in old] if isinstance(old, list) else keep(old)
        return old == new

    saved = {"override": [], **saved}  # runs from before --override had none
    changed = [(n, saved[n], getattr(config, n)) for n in RESUME_FLAGS
               if n in saved and not same(n, saved[n], getattr(config, n))]
    if config.task != "pretrain" or (saved.get("decay_steps") and saved.get("decay_steps") == config.decay_steps):
        changed = [c for c in changed if c[0] != "steps"]  # a fixed schedule: a longer run only goes further
    if changed and not config.allow_flag_changes:
        name, old, new = changed[0]
        more = f" (and {len(changed) - 1} more: {', '.join('--' + c[0].replace('_', '-') for c in changed[1:])})" \
            if len(changed) > 1 else ""
        raise UsageError(f"--{name.replace('_', '-')} {_show(new)} differs from {_show(old)} in {saved_args}, the run "
                         f"being resumed{more}; pass the same value, another --out, or --allow-flag-changes")
    for name, old, new in changed:
        print(f"resuming with --{name.replace('_', '-')} {_show(new)} instead of {_show(old)} (--allow-flag-changes)")


def write_args(config: TrainConfig, cfg, tokenizer, *, resumed: bool) -> None:
    """args.json (rewritten only while no checkpoint exists, or when --allow-flag-changes accepted new
    values) and the resolved model config + tokenizer beside the checkpoints (`python -m zoo` reads them)."""
    path = os.path.join(config.out, ARGS_FILE)
    if resumed and not config.allow_flag_changes and os.path.exists(path):
        return
    with open(path, "w") as f:
        json.dump(config.to_json(), f, indent=1)
    write_run_metadata(config.out, cfg, tokenizer)


@contextlib.contextmanager
def run_dir(out: str, primary: bool):
    """Holds the run directory's lock (process 0) while the run writes it. If the run fails
    before writing anything but the lock, the lock file (and the dir, if this run made it)
    go again: a refused run leaves --out as it found it."""
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


def remove_incomplete_saves(ckpt_dir: str) -> None:
    """Temporary dirs of saves a killed run never finished: ours, useless, and in the way."""
    stale = sorted(glob.glob(os.path.join(ckpt_dir, "*.orbax-checkpoint-tmp*")))
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    if stale:
        print(f"removed {len(stale)} incomplete checkpoint save(s) left by an interrupted run: "
              f"{', '.join(os.path.basename(p) for p in stale)}")


def restorable_step(config: TrainConfig, cfg, ckpt_dir: str, seq_len: int) -> int | None:
    """The step of the newest checkpoint (None: a fresh run); another model's checkpoint or changed
    flags are refused before anything is written or compiled."""
    # The primary process's answer for all: another process may create the directory (its
    # Checkpointer) before this one looks, and every process must open the same Checkpointers.
    if not multihost.allgather_json("checkpoint-dir-exists", os.path.isdir(ckpt_dir))[0]:
        return None
    ckpt = Checkpointer(ckpt_dir, keep=config.keep_checkpoints)
    try:
        start = ckpt.latest_step()
        if start is not None:
            try:
                ckpt.check_compatible(start, {"params": nn.unbox(zoo.abstract_params(cfg, seq_len))})
            except CheckpointMismatch as e:
                raise UsageError(f"{e}; use another --out") from None
    finally:
        ckpt.close()
    return start


def restore(ckpt, step: int, trainer, batches, out: str):
    """The train state saved at `step`, with `batches` put back where it was (UsageError if the
    checkpoint does not fit the trainer)."""
    try:
        state, data_state = ckpt.restore(step, trainer.abstract_state)
    except CheckpointMismatch as e:
        ckpt.close()
        raise UsageError(str(e)) from None
    batches.set_state(data_state)
    if jax.process_index() == 0:
        print(f"resuming {out} from its checkpoint at step {step}")
    return state
