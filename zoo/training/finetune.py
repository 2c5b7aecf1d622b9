"""Fine-tuning through the shared train step: `train.py --task classify | seq2seq`.

    python train.py --task classify --init bert-dir --data train.jsonl --eval-data dev.jsonl --epochs 3 --lr 3e-5
    python train.py --task seq2seq --init t5-dir --data train.jsonl --eval-data dev.jsonl --epochs 5 --lr 1e-3

classify reads JSONL lines {"text": str, "label": int} and trains a BERT-family encoder
(BertForSequenceClassification; a BertModel / BertForMaskedLM checkpoint gets a fresh
classifier head) with the "cls" objective; seq2seq reads {"input": str, "target": str}
and trains T5 with the "seq2seq" objective. Both run zoo.training's one jitted, sharded
step and its one loop (zoo/training/loop.py: SIGTERM/Ctrl-C checkpoint and resume, the
non-finite guard, asynchronous metrics); --init weights (an HF dir or a zoo run dir, via zoo.from_hf) replace the
freshly initialised params in their shards and the optimizer state is re-initialised
for them. After every epoch the eval set is scored (accuracy and macro F1; BLEU and
ROUGE), printed, and added to that epoch's last record in <out>/metrics.jsonl; the run
ends with <out>/accuracy.png (classify) or <out>/scores.png (seq2seq), loss.png, a
checkpoint that `python -m zoo generate/eval/convert` read, and eval_predictions.jsonl.
"""

from __future__ import annotations

import json
import math
import os
import time

import jax
import numpy as np

from zoo import data, registry
from zoo.checkpoint import Checkpointer
from zoo.eval import class_logits, classification_metrics, cross_entropy, generate_texts, text_metrics
from zoo.pretrained import load_pretrained
from zoo.training import run_dir
from zoo.training.config import TrainConfig, UsageError
from zoo.training.loop import Hooks, report_stop, run_loop
from zoo.training.metrics import MetricsLog, peak_flops_per_device, plot_curves, plot_loss
from zoo.training.optimizer import make_optimizer
from zoo.training.pretrain import load_model_config, make_run_mesh, with_overrides
from zoo.training.step import init_state, make_eval_step, make_trainer, mesh_context

FIELDS = {"classify": ("text", "label"), "seq2seq": ("input", "target")}
OBJECTIVE = {"classify": "cls", "seq2seq": "seq2seq"}


# --------------------------------------------------------------------------- preparation


def _records(paths, fields, flag, locations: list | None = None):
    files = data.find_files(paths, flag=flag)
    bad = [str(f) for f in files if not str(f).endswith((".jsonl", ".ndjson"))]
    if bad:
        raise ValueError(f"{flag} {bad[0]}: fine-tuning reads JSONL files (fields {', '.join(fields)})")
    return [r for f in files for r in data.read_jsonl(f, fields, locations)]


def prepare(config: TrainConfig) -> dict:
    """Validates flags, reads and tokenizes the data, loads --init: everything before compiling."""
    task, fields = config.task, FIELDS[config.task]
    if config.data == ["stdlib"]:
        raise UsageError(f"--task {task} needs --data FILE.jsonl with fields {', '.join(fields)}")
    if jax.process_count() > 1 and config.eval_data:
        raise UsageError("--eval-data is scored on one host: fine-tune on several processes without it")
    run_dir.check_run_out(config, sources=(config.init,))
    train_where, eval_where = [], []
    try:
        train_records = _records(config.data, fields, "--data", train_where)
        eval_records = _records(config.eval_data, fields, "--eval-data", eval_where) if config.eval_data else []
    except ValueError as e:
        raise UsageError(str(e)) from None

    if config.init:
        if not os.path.isdir(config.init):
            raise UsageError(f"--init {config.init}: no such model dir (an HF checkpoint or a zoo run dir)")
        pre = load_pretrained(config.init, dtype=None, tokenizer=config.tokenizer)
        cfg, params, tok = pre.cfg, pre.params, pre.tokenizer
        if tok is None:
            raise UsageError(f"--init {config.init} has no tokenizer (tokenizer.json or a sentencepiece "
                             ".model); pass --tokenizer")
    else:
        cfg, params = load_model_config(config.model, {}), None
        if not config.tokenizer:
            raise UsageError(f"--task {task} from scratch (no --init) needs --tokenizer")
        if not os.path.isfile(config.tokenizer):
            raise UsageError(f"--tokenizer file does not exist: {config.tokenizer}")
        tok = data.Tokenizer(config.tokenizer)
    cfg = with_overrides(cfg, config.model_overrides())
    arch = getattr(cfg, "architecture", cfg.hf_architecture)

    limit = min(config.seq_len, cfg.max_seq_len)
    if task == "classify":
        if "classify" not in registry.of(cfg).tasks:
            raise UsageError(f"--task classify fine-tunes BERT-family encoders (BERT, RoBERTa, XLM-RoBERTa); "
                             f"{arch} has no classification head in the zoo")
        labels = np.asarray([r["label"] for r in train_records + eval_records])
        where = train_where + eval_where
        if labels.min() < 0:
            i = int(np.argmin(labels))
            raise UsageError(f"{where[i]}: label {labels[i]} is not a class id (they start at 0)")
        train_labels = labels[: len(train_records)]
        if config.num_labels:
            num_labels = config.num_labels
        elif getattr(cfg, "head", None) == "classify":
            num_labels = cfg.num_labels
        else:  # a fresh head: as many classes as the training set has (a dev set may not widen it)
            num_labels = max(int(train_labels.max()) + 1, 2)
            unseen = [i for i in range(len(train_records), len(labels)) if labels[i] not in set(train_labels)]
            if unseen:
                i = unseen[0]
                raise UsageError(f"{where[i]}: label {labels[i]} never occurs in --data (classes "
                                       f"{sorted(set(train_labels.tolist()))}); fix the label or pass --num-labels")
        if labels.max() >= num_labels:
            i = int(np.argmax(labels))
            raise UsageError(f"{where[i]}: label {labels[i]} is out of range for {num_labels} classes (the "
                             "model's classifier); pass --num-labels")
        cfg = cfg.replace(architecture=cfg.with_head("classify"), num_labels=num_labels)
        train_rows = [data.frame(tok, cfg, r["text"], limit) for r in train_records]
        eval_rows = [data.frame(tok, cfg, r["text"], limit) for r in eval_records]
        seq_len = max(len(r) for r in train_rows)
        rows = {"train": (train_rows, np.asarray([r["label"] for r in train_records], np.int32)),
                "eval": (eval_rows, np.asarray([r["label"] for r in eval_records], np.int32))}
        token_rows = train_rows + eval_rows
    else:
        if "seq2seq" not in registry.of(cfg).tasks:
            raise UsageError(f"--task seq2seq fine-tunes T5 (T5ForConditionalGeneration), not {arch}")
        enc = {k: [data.frame(tok, cfg, r["input"], limit) for r in recs]
               for k, recs in (("train", train_records), ("eval", eval_records))}
        tgt = {k: [data.frame(tok, cfg, r["target"], limit, role="target") for r in recs]
               for k, recs in (("train", train_records), ("eval", eval_records))}
        seq_len = max(max(len(r) for r in enc["train"]), max(len(r) for r in tgt["train"]))
        rows = {k: (enc[k], tgt[k], [r["target"] for r in recs], [r["input"] for r in recs])
                for k, recs in (("train", train_records), ("eval", eval_records))}
        token_rows = enc["train"] + enc["eval"] + tgt["train"] + tgt["eval"]
    top = max((max(r) for r in token_rows if r), default=0)
    if top >= cfg.vocab_size:
        raise UsageError(f"the tokenizer gives id {top} but model {cfg.name!r} has vocab_size="
                               f"{cfg.vocab_size}: tokenizer and model do not match")

    mesh = make_run_mesh(config, cfg, objective=OBJECTIVE[task], seq_len=seq_len)
    return dict(cfg=cfg, params=params, tokenizer=tok, mesh=mesh, seq_len=seq_len, data=rows)

# ------------------------------------------------------------------------------ batches


def _classify_batch(rows, labels, idx, batch_size, seq_len) -> dict:
    ids, seg = data.pad_rows([rows[i] for i in idx], seq_len, rows=batch_size)
    lab = np.zeros((batch_size, seq_len), np.int32)
    lab[: len(idx)] = labels[idx][:, None]  # the label repeated along the row (the objective reads column 0)
    return {"input_ids": ids, "segment_ids": seg, "labels": lab}


def _seq2seq_batch(enc, tgt, idx, batch_size, seq_len, decoder_start: int) -> dict:
    ids, seg = data.pad_rows([enc[i] for i in idx], seq_len, rows=batch_size)
    targets, dec_seg = data.pad_rows([tgt[i] for i in idx], seq_len, rows=batch_size)
    dec_in = np.full_like(targets, decoder_start)
    dec_in[:, 1:] = targets[:, :-1]  # teacher forcing: the decoder sees the targets shifted right
    return {"input_ids": ids, "segment_ids": seg, "decoder_input_ids": np.where(dec_seg > 0, dec_in, 0),
            "decoder_segment_ids": dec_seg, "targets": targets}


class EpochBatches:
    """Fine-tuning batches: every epoch a fresh permutation of the examples (drawn from (seed, epoch),
    so a resumed run sees the order an uninterrupted one would), the last batch topped up with empty
    rows. Its state is (epoch, batch index); a process yields its share of each global batch's rows."""

    def __init__(self, make_batch, n: int, batch_size: int, seed: int):
        self.make_batch, self.n, self.b, self.seed = make_batch, n, batch_size, seed
        self.per_epoch = math.ceil(n / batch_size)
        self.epoch, self.index = 0, 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        batch = self.make_batch(order[self.index * self.b:(self.index + 1) * self.b])
        self.index += 1
        if self.index == self.per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        local = self.b // jax.process_count()
        first = jax.process_index() * local
        return {k: v[first:first + local] for k, v in batch.items()}

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def set_state(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


# ------------------------------------------------------------------------------ loading


def merge_params(fresh, loaded):
    """`fresh` params with every tensor of `loaded` that has the same path and shape put in its place.

    Each taken tensor lands with the fresh leaf's dtype and sharding. Returns (params,
    kept, fresh, dropped): paths taken from `loaded`, paths left freshly initialised (a
    new classifier, or one of another shape), and `loaded` paths not used (an MLM head).
    """
    def name(path):
        return "/".join(str(k.key) for k in path)

    src = {name(p): x for p, x in jax.tree_util.tree_flatten_with_path(loaded)[0]}
    leaves, treedef = jax.tree_util.tree_flatten_with_path(fresh)
    kept, new_fresh, out = [], [], []
    for path, leaf in leaves:
        key = name(path)
        if key in src and tuple(src[key].shape) == tuple(leaf.shape):
            out.append(jax.device_put(np.asarray(src[key]).astype(leaf.dtype), leaf.sharding))
            kept.append(key)
        else:
            out.append(leaf)
            new_fresh.append(key)
    dropped = sorted(set(src) - set(kept))
    return jax.tree_util.tree_unflatten(treedef, out), kept, new_fresh, dropped


def load_into(state, loaded, trainer, mesh, opt):
    """`state` with --init's tensors in place of the fresh ones (same shards) and a fresh optimizer state."""
    params, kept, fresh, dropped = merge_params(state["params"], loaded)
    tx, _ = make_optimizer(opt)
    with mesh_context(mesh):  # Adam's moments start from zero for the new params
        opt_state = jax.jit(tx.init, out_shardings=trainer.state_shardings["opt_state"])(params)
    print(f"loaded {len(kept)} tensors; fresh: {', '.join(fresh) or 'none'}; not used: {', '.join(dropped) or 'none'}")
    return {**state, "params": params, "opt_state": opt_state}


# ------------------------------------------------------------------------------- eval


def evaluate(config: TrainConfig, trainer, state, plan: dict, eval_step) -> tuple[dict, list[dict]]:
    """Eval metrics of the current params, and per-example predictions."""
    task = config.task
    mesh, tok, cfg, b = plan["mesh"], plan["tokenizer"], plan["cfg"], config.batch_size
    progress = not config.no_progress
    if task == "classify":
        rows, labels = plan["data"]["eval"]

        def put(x):
            return jax.device_put(x, trainer.batch_sharding)

        with mesh_context(mesh):
            logits = class_logits(trainer.model, state["params"], rows, seq_len=max(len(r) for r in rows),
                                     batch_size=b, put=put, progress=progress)
        preds = logits.argmax(axis=1)
        metrics = {"eval_loss": cross_entropy(logits, labels),
                   **{f"eval_{k}": v for k, v in classification_metrics(preds, labels).items()}}
        return metrics, [{"label": int(y), "prediction": int(p)} for y, p in zip(labels, preds)]

    enc, tgt, refs, inputs = plan["data"]["eval"]
    seq_len = plan["seq_len"]
    nll = weight = 0.0
    with mesh_context(mesh):
        for a in range(0, len(enc), b):
            batch = _seq2seq_batch([r[:seq_len] for r in enc], [r[:seq_len] for r in tgt],
                                   np.arange(a, min(a + b, len(enc))), b, seq_len, cfg.decoder_start_token_id)
            s, w = eval_step(state["params"], {k: jax.device_put(v, trainer.batch_sharding) for k, v in batch.items()},
                             None)
            nll, weight = nll + float(s), weight + float(w)
    host_params = jax.device_get(state["params"])  # generation is a one-device loop, as pretrain.sample
    max_new = config.eval_max_new_tokens or max(len(t) for t in tgt)
    hyps = generate_texts(trainer.model, host_params, tok, enc, seq_len=max(len(r) for r in enc), batch_size=b,
                          max_new_tokens=max_new, progress=progress)
    metrics = {"eval_loss": nll / max(weight, 1.0), **{f"eval_{k}": v for k, v in text_metrics(hyps, refs).items()}}
    return metrics, [{"input": i, "target": t, "prediction": h} for i, t, h in zip(inputs, refs, hyps)]


def _epoch_line(s: dict, epochs: int) -> str:
    line = f"epoch {s['epoch']}/{epochs}: train loss {s['train_loss']:.4f} accuracy {s['train_accuracy']:.4f}"
    if "eval_loss" in s:
        line += f" | eval loss {s['eval_loss']:.4f}"
        line += "".join(f" {k[5:]} {s[k]:.4f}" for k in ("eval_accuracy", "eval_f1") if k in s)
        line += "".join(f" {k[5:]} {s[k]:.2f}" for k in ("eval_bleu", "eval_rouge1", "eval_rouge2", "eval_rougeL")
                        if k in s)
    return line


class FinetuneHooks(Hooks):
    """At every epoch's end: the epoch's train figures and the eval set's, in that step's record."""

    def __init__(self, config: TrainConfig, trainer, plan: dict, steps_per_epoch: int, earlier: list[dict]):
        self.config, self.trainer, self.plan = config, trainer, plan
        self.eval_every = steps_per_epoch
        self.records = list(earlier)  # this epoch's records so far (a resumed run's come from metrics.jsonl)
        self.eval_step = make_eval_step(trainer, "seq2seq") if config.task == "seq2seq" else None

    def record_fields(self, step: int) -> dict:
        return {"epoch": (step - 1) // self.eval_every + 1}

    def on_record(self, record: dict) -> None:
        self.records.append(record)

    def evaluate(self, state, step: int) -> dict:
        epoch = (step - 1) // self.eval_every + 1
        records = [r for r in self.records if r.get("epoch") == epoch]
        weight = max(sum(r["targets"] for r in records), 1.0)
        summary = {"train_loss": sum(r["loss"] * r["targets"] for r in records) / weight,
                   "train_accuracy": sum(r["accuracy"] * r["targets"] for r in records) / weight}
        if self.plan["data"]["eval"][0]:
            metrics, predictions = evaluate(self.config, self.trainer, state, self.plan, self.eval_step)
            summary.update(metrics)
            if jax.process_index() == 0:
                with open(os.path.join(self.config.out, "eval_predictions.jsonl"), "w") as f:
                    f.writelines(json.dumps(p) + "\n" for p in predictions)
        self.records = []
        if jax.process_index() == 0:
            print(_epoch_line({"epoch": epoch, **summary}, self.config.epochs))
        return summary


# --------------------------------------------------------------------------- the run


def run(config: TrainConfig) -> dict:
    """Runs `--task classify | seq2seq`; returns the summary (UsageError on bad flags or data, before
    anything compiles or is written)."""
    plan = prepare(config)
    with run_dir.run_dir(config.out, jax.process_index() == 0):
        return _run_locked(config, plan)


def _make_batch(config: TrainConfig, plan: dict):
    b, seq_len = config.batch_size, plan["seq_len"]
    if config.task == "classify":
        rows, labels = plan["data"]["train"]
        return lambda idx: _classify_batch(rows, labels, idx, b, seq_len)
    enc, tgt = plan["data"]["train"][:2]
    start = plan["cfg"].decoder_start_token_id
    return lambda idx: _seq2seq_batch(enc, tgt, idx, b, seq_len, start)


def _run_locked(config: TrainConfig, plan: dict) -> dict:
    task, cfg, mesh, out, seq_len = config.task, plan["cfg"], plan["mesh"], config.out, plan["seq_len"]
    primary = jax.process_index() == 0
    ckpt_dir = os.path.join(out, "checkpoints")
    if primary and os.path.isdir(ckpt_dir):
        run_dir.remove_incomplete_saves(ckpt_dir)
    n_train, b = len(plan["data"]["train"][0]), config.batch_size
    steps_per_epoch = math.ceil(n_train / b)  # the last batch is topped up with empty rows (no weight)
    total = config.epochs * steps_per_epoch
    start = run_dir.restorable_step(config, cfg, ckpt_dir, seq_len)
    if start is not None:
        run_dir.check_resume_flags(config, start, total)
    if primary:
        run_dir.write_args(config, cfg, plan["tokenizer"], resumed=start is not None)

    opt = config.optim(total)
    t0 = time.time()
    trainer = make_trainer(cfg, mesh, opt, objective=OBJECTIVE[task], batch_size=b, seq_len=seq_len,
                           grad_accum=config.grad_accum, z_loss=config.z_loss)
    compile_s = time.time() - t0
    batches = EpochBatches(_make_batch(config, plan), n_train, b, config.seed)
    ckpt = Checkpointer(ckpt_dir, keep=config.keep_checkpoints)
    if start is None:
        state, start = init_state(trainer, mesh, config.seed), 0
        if plan["params"] is not None:
            print(f"initialising from {config.init}: ", end="")
            state = load_into(state, plan["params"], trainer, mesh, opt)
    else:
        state = run_dir.restore(ckpt, start, trainer, batches, out)
    n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    if primary:
        print(f"fine-tuning {cfg.name} ({getattr(cfg, 'architecture', cfg.hf_architecture)}, {n_params / 1e6:.2f}M "
              f"params) for {task}: {n_train} examples, {config.epochs} epochs x {steps_per_epoch} steps of {b} rows "
              f"x {seq_len} tokens; step compiled in {compile_s:.1f}s")

    log = MetricsLog(out, resume_step=start) if primary else None
    earlier = [r for r in log.history() if r.get("epoch") == start // steps_per_epoch + 1] if log and start else []
    peak, _ = peak_flops_per_device(config.peak_flops)
    result = run_loop(trainer, mesh, state, batches, start=start, total=total, ckpt=ckpt, log=log,
                      checkpoint_every=min(config.checkpoint_every, steps_per_epoch), log_every=config.log_every,
                      max_nonfinite=config.max_nonfinite, flops_per_token=cfg.flops_per_token(seq_len),
                      peak_flops=peak, hooks=FinetuneHooks(config, trainer, plan, steps_per_epoch, earlier),
                      progress=primary and not config.no_progress)
    history = log.history() if log is not None else []
    if log is not None:
        log.close()
    last = report_stop(result, out)
    epochs = [{"epoch": r["epoch"], "step": r["step"], **{k: v for k, v in r.items()
                                                          if k.startswith(("train_", "eval_"))}}
              for r in history if "train_loss" in r]
    if history and epochs and primary:
        plot_loss(history, os.path.join(out, "loss.png"))
        figure = os.path.join(out, "accuracy.png" if task == "classify" else "scores.png")
        plot_curves(history, epochs, figure, task=task, steps_per_epoch=steps_per_epoch)
        print(f"curves in {figure}; metrics in {os.path.join(out, 'metrics.jsonl')}")
    return {"task": task, "out": out, "epochs": epochs, "losses": result.losses, "steps": last,
            "stopped": result.stopped}
