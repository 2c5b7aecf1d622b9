"""`python train.py`: flags -> TrainConfig -> pretraining, fine-tuning or the AOT planner.

    python train.py                                    # the embedded default (CPU, minutes)
    python train.py --model llama3.1-8b --data corpus/ --mesh fsdp=-1,tensor=4 --out runs/8b

The step `train_step(state, batch) -> (state, metrics)` is the same for every model
and objective (zoo/training/step.py), and one loop runs it for pretraining and
fine-tuning (zoo/training/loop.py).

With no arguments this pretrains `small-llama` on the Python standard library's own
sources (a corpus every machine has), trains a sentencepiece tokenizer for it first,
and prints a sample. Its output goes to runs/default; rerunning resumes there (and,
once finished, only samples): pass --out DIR for a fresh run.

Bad flags exit with status 2 and one line on stderr, before anything compiles.
"""

from __future__ import annotations

import sys
import time

import jax

from zoo.hf.rules import CheckpointError
from zoo.pretrained import EvalError
from zoo.training import finetune, plan, pretrain
from zoo.training.config import TrainConfig, UsageError
from zoo.training.distributed import INTERRUPTED, NonFiniteStop, init_distributed

_PARAGRAPHS = __doc__.split("\n\n")


def _die(message: str, status: int = 2) -> int:
    print(f"train.py: error: {message}", file=sys.stderr)
    return status


def parse(argv: list[str] | None = None) -> TrainConfig:
    """The TrainConfig of a command line (UsageError on a bad flag)."""
    return TrainConfig.from_args(argv, description=_PARAGRAPHS[0].split(": ", 1)[1].strip(),
                                 epilog=_PARAGRAPHS[3])


def main(argv: list[str] | None = None) -> dict | int:
    """Runs train.py; returns a summary dict, or an exit status: 2 for bad flags or inputs (one line on
    stderr, before compiling), 3 when too many non-finite steps stopped the run, 130 after Ctrl-C."""
    t0 = time.time()
    try:
        config = parse(argv)
        init_distributed(config)
        if config.compile_only:
            return plan.compile_only(config)
        if config.task == "pretrain":
            summary = pretrain.run(config)
        else:
            summary = finetune.run(config)
    except (UsageError, EvalError, CheckpointError, FileNotFoundError) as e:
        return _die(str(e))
    except NonFiniteStop as e:
        return _die(str(e), status=3)
    except KeyboardInterrupt:  # Ctrl-C before the first step: nothing to save yet
        return _die("interrupted (Ctrl-C) before training started; nothing was saved", status=130)
    summary["wall_s"] = time.time() - t0
    if jax.process_index() == 0:
        print(f"done in {summary['wall_s']:.0f}s; run directory {config.out}")
    return INTERRUPTED if summary.get("stopped") == "sigint" else summary
