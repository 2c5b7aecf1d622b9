"""What a run logs: metrics.jsonl, TensorBoard, loss.png / accuracy.png / scores.png, and MFU's peak."""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import matplotlib
from tensorboardX import SummaryWriter

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the non-interactive backend)

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


def peak_flops_per_device(override: float | None = None) -> tuple[float, str]:
    """(peak FLOP/s per device, where the figure comes from) for the MFU denominator."""

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
                name = f"eval/{k[5:]}" if k.startswith("eval_") else f"train/{k}"
                self.tb.add_scalar(name, v, record["step"])

    def history(self) -> list[dict]:
        with open(self.path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def close(self) -> None:
        self.file.close()
        self.tb.close()


def plot_loss(records: list[dict], path: str) -> None:
    """Training loss against step (the last record per step wins, for runs that resumed), and the
    held-out eval loss where the records have one."""
    by_step = {r["step"]: r["loss"] for r in records}
    evals = {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}
    steps = sorted(by_step)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, [by_step[s] for s in steps], label="train")
    if evals:
        ax.plot(sorted(evals), [evals[s] for s in sorted(evals)], "o-", label="eval (held out)")
        ax.legend()
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_curves(history: list[dict], epochs: list[dict], path: str, *, task: str, steps_per_epoch: int) -> None:
    """Train and eval curves by epoch: accuracy (classify) or BLEU/ROUGE-L (seq2seq), and the losses."""
    x = [e["epoch"] for e in epochs]
    fig, (ax, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    if task == "classify":
        ax.plot(x, [e["train_accuracy"] for e in epochs], "o-", label="train accuracy")
        if "eval_accuracy" in epochs[0]:
            ax.plot(x, [e["eval_accuracy"] for e in epochs], "o-", label="eval accuracy")
            ax.plot(x, [e["eval_f1"] for e in epochs], "s--", label="eval F1 (macro)")
        ax.set_ylabel("accuracy / F1")
        ax.set_ylim(0, 1.02)
    else:
        ax.plot(x, [100 * e["train_accuracy"] for e in epochs], "o-", label="train token accuracy (%)")
        if "eval_bleu" in epochs[0]:
            ax.plot(x, [e["eval_bleu"] for e in epochs], "o-", label="eval BLEU")
            ax.plot(x, [e["eval_rougeL"] for e in epochs], "s--", label="eval ROUGE-L")
        ax.set_ylabel("score (0-100)")
    ax.set_xlabel("epoch")
    ax.legend()
    ax.grid(alpha=0.3)
    ax_loss.plot([r["step"] / steps_per_epoch for r in history], [r["loss"] for r in history], alpha=0.6,
                 label="train loss (per step)")
    ax_loss.plot(x, [e["train_loss"] for e in epochs], "o-", label="train loss (epoch mean)")
    if "eval_loss" in epochs[0]:
        ax_loss.plot(x, [e["eval_loss"] for e in epochs], "o-", label="eval loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss (nats)")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
