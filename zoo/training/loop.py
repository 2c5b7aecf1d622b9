"""THE training loop, shared by pretraining and fine-tuning.

    result = run_loop(trainer, mesh, state, batches, start=0, total=200, ckpt=ckpt, log=log, ...)

Per step it reads and sends the next batch while the previous step still runs, then reads
that previous step's metrics (so --max-nonfinite N stops after exactly N bad steps and the
device is never waited on for logging alone), and dispatches the step. It checkpoints every
`checkpoint_every` steps and at the end; SIGTERM or Ctrl-C finish the step, checkpoint and
stop (the run resumes from there); a run of non-finite steps saves the last good state and
stops. What differs between tasks comes in through `Hooks`: extra record fields, and a
held-out evaluation every `hooks.eval_every` steps whose figures join that step's record.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import jax
from tqdm import tqdm

from zoo.training.distributed import NonFiniteStop, StopRequest
from zoo.training.step import mesh_context


class Hooks:
    """What a task adds to the loop. The defaults add nothing."""

    eval_every: int | None = None  # steps between evaluate() calls (and at the last step); None: never

    def record_fields(self, step: int) -> dict:
        """Extra fields of step `step`'s record (e.g. the epoch)."""
        return {}

    def on_record(self, record: dict) -> None:
        """Called with every step's record, logged or not, before any evaluation of that step."""

    def evaluate(self, state, step: int) -> dict:
        """Held-out figures of the state after `step` steps, merged into that step's record."""
        return {}


@dataclass
class LoopResult:
    state: dict
    stopped: str | None  # None (finished), "sigterm", "sigint" or "nonfinite"
    nonfinite_run: int  # consecutive non-finite steps at the end
    losses: list = field(default_factory=list)  # every step's loss, in order (this process's run)
    records: list = field(default_factory=list)  # every step's record (logged or not)


def run_loop(trainer, mesh, state, batches, *, start: int, total: int, ckpt, log, checkpoint_every: int,
             log_every: int = 1, max_nonfinite: int = 10, flops_per_token: float = 0.0, peak_flops: float = 1.0,
             fields=None, hooks: Hooks | None = None, progress: bool = True) -> LoopResult:
    """Trains from step `start` to `total`. `batches` yields this process's rows as numpy dicts and has
    get_state()/set_state() (saved with each checkpoint); `log` is a MetricsLog or None (other processes)."""
    hooks = hooks or Hooks()
    fields = tuple(fields or trainer.batch_fields)
    result = LoopResult(state, None, 0)
    bar = tqdm(total=total, initial=min(start, total), disable=not progress, unit="step", dynamic_ncols=True)
    last_time = time.time()

    def to_global(batch):  # this process's rows -> one global array per field
        return {k: jax.make_array_from_process_local_data(trainer.batch_sharding, batch[k]) for k in fields}

    def finish(step, metrics) -> dict:
        nonlocal last_time
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}  # waits for that step to finish
        now = time.time()
        tps = m["tokens"] / max(now - last_time, 1e-9)
        last_time = now
        record = {"step": step, "loss": m["loss"], "learning_rate": m["learning_rate"], "grad_norm": m["grad_norm"],
                  "tokens_per_second": tps, "mfu": flops_per_token * tps / (jax.device_count() * peak_flops)}
        record.update({k: v for k, v in m.items() if k not in record})
        record.update(hooks.record_fields(step))
        result.losses.append(m["loss"])
        result.records.append(record)
        result.nonfinite_run = result.nonfinite_run + 1 if m["nonfinite"] else 0
        hooks.on_record(record)
        bar.set_postfix(loss=f"{m['loss']:.3f}", tok_s=f"{tps:,.0f}")
        bar.update(1)
        return record

    def write(record) -> None:
        step = record["step"]
        if log is not None and (step % log_every == 0 or step == total or any(k.startswith("eval_") for k in record)):
            log.write(record)

    stop = StopRequest()
    pending = None  # (step, metrics on device): read once the next batch is on its way
    saved_step = start if start else None  # the step of the newest checkpoint on disk
    try:
        with mesh_context(mesh):
            for step in range(start, total):
                data_state = batches.get_state()  # before this batch: a stop here resumes with it
                batch = to_global(next(batches))
                if pending is not None:
                    write(finish(*pending))
                    pending = None
                if result.nonfinite_run >= max_nonfinite:
                    result.stopped = "nonfinite"
                else:
                    result.stopped = stop.requested()
                if result.stopped:
                    # Params are unchanged by non-finite steps: this is the last good state.
                    if saved_step != step:
                        ckpt.save(step, state, data_state)
                    break
                state, metrics = trainer.step(state, batch)
                pending = (step + 1, metrics)
                if hooks.eval_every and ((step + 1) % hooks.eval_every == 0 or step + 1 == total):
                    record = finish(*pending)
                    pending = None
                    record.update(hooks.evaluate(state, step + 1))
                    write(record)
                if (step + 1) % checkpoint_every == 0 or step + 1 == total:
                    ckpt.save(step + 1, state, batches.get_state())
                    saved_step = step + 1
            if pending is not None:
                write(finish(*pending))
    finally:  # let a save in flight finish, so the next run resumes from it
        stop.close()
        bar.close()
        ckpt.close()
    result.state = state
    return result


def report_stop(result: LoopResult, out: str) -> int:
    """The step the run ended at; a non-finite stop raises NonFiniteStop (exit status 3) and a signal
    stop says where the checkpoint is."""
    last = int(jax.device_get(result.state["step"]))
    if result.stopped == "nonfinite":
        raise NonFiniteStop(f"{result.nonfinite_run} steps in a row had a non-finite loss or gradient norm (the last "
                            f"at step {last}); their updates were skipped and the last good params are checkpointed "
                            f"at step {last} in {out}. Lower --lr or check the data, then rerun to resume.")
    if result.stopped in ("sigterm", "sigint") and jax.process_index() == 0:
        print(f"{'SIGTERM' if result.stopped == 'sigterm' else 'Ctrl-C'}: checkpoint saved at step {last}; rerun the "
              "same command to resume")
    return last
