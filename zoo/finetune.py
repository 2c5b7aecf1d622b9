"""Fine-tuning through the shared train step: `train.py --task classify | seq2seq`.

    python train.py --task classify --init bert-dir --data train.jsonl --eval-data dev.jsonl --epochs 3 --lr 3e-5
    python train.py --task seq2seq --init t5-dir --data train.jsonl --eval-data dev.jsonl --epochs 5 --lr 1e-3

classify reads JSONL lines {"text": str, "label": int} and trains a BERT-family encoder
(BertForSequenceClassification; a BertModel / BertForMaskedLM checkpoint gets a fresh
classifier head) with the "cls" objective; seq2seq reads {"input": str, "target": str}
and trains T5 with the "seq2seq" objective. Both run `train.make_trainer`'s one jitted,
sharded step; --init weights (an HF dir or a zoo run dir, via zoo.from_hf) replace the
freshly initialised params in their shards and the optimizer state is re-initialised
for them. After every epoch the eval set is scored (accuracy and macro F1; BLEU and
ROUGE), printed, and added to that epoch's last record in <out>/metrics.jsonl; the run
ends with <out>/accuracy.png (classify) or <out>/scores.png (seq2seq), loss.png, a
checkpoint that `python -m zoo generate/eval/convert` read, and eval_predictions.jsonl.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import time

import numpy as np

from zoo.argtypes import positive_int

TASKS = ("pretrain", "classify", "seq2seq")
FIELDS = {"classify": ("text", "label"), "seq2seq": ("input", "target")}
OBJECTIVE = {"classify": "cls", "seq2seq": "seq2seq"}


def add_arguments(parser) -> None:
    """Adds the fine-tuning flags to train.py's parser."""
    g = parser.add_argument_group(
        "fine-tuning (--task classify | seq2seq; also uses --data, --out, --batch-size, --seq-len, --lr and the "
        "optimisation flags; --steps is not used)")
    g.add_argument("--task", choices=TASKS, default="pretrain",
                   help="pretrain (the objective on raw text), classify (JSONL fields text, label; BERT) or "
                        "seq2seq (JSONL fields input, target; T5)")
    g.add_argument("--init", default=None, metavar="DIR",
                   help="weights to fine-tune: an HF checkpoint dir or a zoo run dir, with its tokenizer "
                        "(default: --model from scratch, which then needs --tokenizer)")
    g.add_argument("--eval-data", nargs="+", default=None, metavar="PATH",
                   help="JSONL scored after every epoch (same fields as --data)")
    g.add_argument("--epochs", type=positive_int, default=3, help="passes over --data when fine-tuning")
    g.add_argument("--num-labels", type=positive_int, default=None,
                   help="classify: number of classes (default: the checkpoint's classifier, or the largest "
                        "label + 1 for a fresh head; a different number gets a fresh head)")
    g.add_argument("--eval-max-new-tokens", type=positive_int, default=None,
                   help="seq2seq: output tokens generated per eval example (default: the longest eval target)")


def run(args):
    """Runs `--task classify | seq2seq` from train.py's parsed flags.

    Returns a summary dict, or 2 after printing one `train.py: error:` line when the
    flags or the data are unusable (checked before anything compiles).
    """
    import train
    from zoo.evaluate import EvalError
    from zoo.hf import CheckpointError

    t0 = time.time()
    try:
        plan = _prepare(args, train)
    except (train.UsageError, EvalError, CheckpointError, FileNotFoundError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    summary = _finetune(args, plan, train)
    summary["wall_s"] = time.time() - t0
    print(f"done in {summary['wall_s']:.0f}s; run directory {plan['out']}")
    return summary


# --------------------------------------------------------------------------- preparation


def _records(paths, fields, flag, locations: list | None = None):
    from zoo.data import find_files, read_jsonl

    files = find_files(paths, flag=flag)
    bad = [str(f) for f in files if not str(f).endswith((".jsonl", ".ndjson"))]
    if bad:
        raise ValueError(f"{flag} {bad[0]}: fine-tuning reads JSONL files (fields {', '.join(fields)})")
    return [r for f in files for r in read_jsonl(f, fields, locations)]


def _prepare(args, train) -> dict:
    """Validates flags, reads and tokenizes the data, loads --init: everything before compiling."""
    import jax

    from zoo import evaluate as ev
    from zoo.data import Tokenizer
    from zoo.paths import OutputError, RunLock, check_new_dir
    from zoo.sharding import check_divisible, make_mesh

    task, fields = args.task, FIELDS[args.task]
    if args.data == ["stdlib"]:
        raise train.UsageError(f"--task {task} needs --data FILE.jsonl with fields {', '.join(fields)}")
    if jax.process_count() > 1:
        raise train.UsageError("fine-tuning runs on one host (its batches are built in this process)")
    out = args.out
    try:
        check_new_dir(out, flag="--out", sources=[args.init] if args.init else [])
    except OutputError as e:
        raise train.UsageError(f"{e}; fine-tuning starts a fresh run") from None
    train_where, eval_where = [], []
    try:
        train_records = _records(args.data, fields, "--data", train_where)
        eval_records = _records(args.eval_data, fields, "--eval-data", eval_where) if args.eval_data else []
    except ValueError as e:
        raise train.UsageError(str(e)) from None

    if args.init:
        if not os.path.isdir(args.init):
            raise train.UsageError(f"--init {args.init}: no such model dir (an HF checkpoint or a zoo run dir)")
        pre = ev.load_pretrained(args.init, dtype=None, tokenizer=args.tokenizer)
        cfg, params, tok = pre.cfg, pre.params, pre.tokenizer
        if tok is None:
            raise train.UsageError(f"--init {args.init} has no tokenizer (tokenizer.json or a sentencepiece "
                                   ".model); pass --tokenizer")
    else:
        cfg, params = train.load_model_config(args.model, {}), None
        if not args.tokenizer:
            raise train.UsageError(f"--task {task} from scratch (no --init) needs --tokenizer")
        if not os.path.isfile(args.tokenizer):
            raise train.UsageError(f"--tokenizer file does not exist: {args.tokenizer}")
        tok = Tokenizer(args.tokenizer)
    overrides = {k: v for k, v in (("dtype", args.dtype), ("param_dtype", args.param_dtype), ("remat", args.remat))
                 if v is not None}
    cfg = cfg.replace(**overrides) if overrides else cfg
    arch = getattr(cfg, "architecture", cfg.hf_architecture)

    limit = min(args.seq_len, cfg.max_seq_len)
    if task == "classify":
        if cfg.family != "bert":
            raise train.UsageError(f"--task classify fine-tunes BERT-family encoders (BertModel, BertForMaskedLM, "
                                   f"BertForSequenceClassification); {arch} has no classification head in the zoo")
        labels = np.asarray([r["label"] for r in train_records + eval_records])
        where = train_where + eval_where
        if labels.min() < 0:
            i = int(np.argmin(labels))
            raise train.UsageError(f"{where[i]}: label {labels[i]} is not a class id (they start at 0)")
        train_labels = labels[: len(train_records)]
        if args.num_labels:
            num_labels = args.num_labels
        elif arch == "BertForSequenceClassification":
            num_labels = cfg.num_labels
        else:  # a fresh head: as many classes as the training set has (a dev set may not widen it)
            num_labels = max(int(train_labels.max()) + 1, 2)
            unseen = [i for i in range(len(train_records), len(labels)) if labels[i] not in set(train_labels)]
            if unseen:
                i = unseen[0]
                raise train.UsageError(f"{where[i]}: label {labels[i]} never occurs in --data (classes "
                                       f"{sorted(set(train_labels.tolist()))}); fix the label or pass --num-labels")
        if labels.max() >= num_labels:
            i = int(np.argmax(labels))
            raise train.UsageError(f"{where[i]}: label {labels[i]} is out of range for {num_labels} classes (the "
                                   "model's classifier); pass --num-labels")
        cfg = cfg.replace(architecture="BertForSequenceClassification", num_labels=num_labels)
        train_rows = [ev.frame(tok, cfg, r["text"], limit) for r in train_records]
        eval_rows = [ev.frame(tok, cfg, r["text"], limit) for r in eval_records]
        seq_len = max(len(r) for r in train_rows)
        data = {"train": (train_rows, np.asarray([r["label"] for r in train_records], np.int32)),
                "eval": (eval_rows, np.asarray([r["label"] for r in eval_records], np.int32))}
        token_rows = train_rows + eval_rows
    else:
        if cfg.family != "t5":
            raise train.UsageError(f"--task seq2seq fine-tunes T5 (T5ForConditionalGeneration), not {arch}")
        enc = {k: [ev.frame(tok, cfg, r["input"], limit) for r in recs]
               for k, recs in (("train", train_records), ("eval", eval_records))}
        tgt = {k: [ev.frame(tok, cfg, r["target"], limit, role="target") for r in recs]
               for k, recs in (("train", train_records), ("eval", eval_records))}
        seq_len = max(max(len(r) for r in enc["train"]), max(len(r) for r in tgt["train"]))
        data = {k: (enc[k], tgt[k], [r["target"] for r in recs], [r["input"] for r in recs])
                for k, recs in (("train", train_records), ("eval", eval_records))}
        token_rows = enc["train"] + enc["eval"] + tgt["train"] + tgt["eval"]
    top = max((max(r) for r in token_rows if r), default=0)
    if top >= cfg.vocab_size:
        raise train.UsageError(f"the tokenizer gives id {top} but model {cfg.name!r} has vocab_size="
                               f"{cfg.vocab_size}: tokenizer and model do not match")

    try:
        mesh = make_mesh(args.mesh)
        check_divisible(cfg, mesh)
    except ValueError as e:
        raise train.UsageError(str(e)) from None
    shards = mesh.shape["data"] * mesh.shape["fsdp"] * mesh.shape["expert"]
    if args.batch_size % args.grad_accum:
        raise train.UsageError(f"--grad-accum {args.grad_accum} does not divide --batch-size {args.batch_size}")
    if (args.batch_size // args.grad_accum) % shards:
        raise train.UsageError(f"microbatch of {args.batch_size // args.grad_accum} rows does not split over the "
                               f"{shards} batch shards of --mesh {args.mesh} (data*fsdp*expert)")
    try:  # last: a refused run leaves nothing behind; held until the run ends (a second one is refused)
        lock = RunLock(out)
    except OutputError as e:
        raise train.UsageError(str(e)) from None
    return dict(cfg=cfg, params=params, tokenizer=tok, mesh=mesh, seq_len=seq_len, data=data, out=out, lock=lock)


# ------------------------------------------------------------------------------ batches


def _classify_batch(rows, labels, idx, batch_size, seq_len) -> dict:
    from zoo.evaluate import pad_rows

    ids, seg = pad_rows([rows[i] for i in idx], seq_len, rows=batch_size)
    lab = np.zeros((batch_size, seq_len), np.int32)
    lab[: len(idx)] = labels[idx][:, None]  # the label repeated along the row (the objective reads column 0)
    return {"input_ids": ids, "segment_ids": seg, "labels": lab}


def _seq2seq_batch(enc, tgt, idx, batch_size, seq_len, decoder_start: int) -> dict:
    from zoo.evaluate import pad_rows

    ids, seg = pad_rows([enc[i] for i in idx], seq_len, rows=batch_size)
    targets, dec_seg = pad_rows([tgt[i] for i in idx], seq_len, rows=batch_size)
    dec_in = np.full_like(targets, decoder_start)
    dec_in[:, 1:] = targets[:, :-1]  # teacher forcing: the decoder sees the targets shifted right
    return {"input_ids": ids, "segment_ids": seg, "decoder_input_ids": np.where(dec_seg > 0, dec_in, 0),
            "decoder_segment_ids": dec_seg, "targets": targets}


# ------------------------------------------------------------------------------ loading


def merge_params(fresh, loaded):
    """`fresh` params with every tensor of `loaded` that has the same path and shape put in its place.

    Each taken tensor lands with the fresh leaf's dtype and sharding. Returns (params,
    kept, fresh, dropped): paths taken from `loaded`, paths left freshly initialised (a
    new classifier, or one of another shape), and `loaded` paths not used (an MLM head).
    """
    import jax

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


def _load_into(state, loaded, trainer, mesh, opt, train):
    """`state` with --init's tensors in place of the fresh ones (same shards) and a fresh optimizer state."""
    import jax

    params, kept, fresh, dropped = merge_params(state["params"], loaded)
    tx, _ = train.make_optimizer(opt)
    with train.mesh_context(mesh):  # Adam's moments start from zero for the new params
        opt_state = jax.jit(tx.init, out_shardings=trainer.state_shardings["opt_state"])(params)
    print(f"loaded {len(kept)} tensors; fresh: {', '.join(fresh) or 'none'}; not used: {', '.join(dropped) or 'none'}")
    return {**state, "params": params, "opt_state": opt_state}


# ------------------------------------------------------------------------------- eval


def _eval_sums(model, loss_fn, params, batch):
    _, sums = loss_fn(model, params, batch, None)
    return sums["nll"], sums["weight"]


def _evaluate(task, trainer, state, plan, args, train) -> tuple[dict, list[dict]]:
    """Eval metrics of the current params, and per-example predictions."""
    import jax

    from zoo import evaluate as ev
    from zoo.objectives import get as get_objective

    mesh, tok, cfg, b = plan["mesh"], plan["tokenizer"], plan["cfg"], args.batch_size
    progress = not args.no_progress
    if task == "classify":
        rows, labels = plan["data"]["eval"]

        def put(x):
            return jax.device_put(x, trainer.batch_sharding)

        with train.mesh_context(mesh):
            logits = ev.class_logits(trainer.model, state["params"], rows, seq_len=max(len(r) for r in rows),
                                     batch_size=b, put=put, progress=progress)
        preds = logits.argmax(axis=1)
        metrics = {"eval_loss": ev.cross_entropy(logits, labels),
                   **{f"eval_{k}": v for k, v in ev.classification_metrics(preds, labels).items()}}
        return metrics, [{"label": int(y), "prediction": int(p)} for y, p in zip(labels, preds)]

    enc, tgt, refs, inputs = plan["data"]["eval"]
    seq_len, loss_fn = plan["seq_len"], get_objective("seq2seq").loss_fn
    step = _eval_step()
    nll = weight = 0.0
    with train.mesh_context(mesh):
        for a in range(0, len(enc), b):
            batch = _seq2seq_batch([r[:seq_len] for r in enc], [r[:seq_len] for r in tgt],
                                   np.arange(a, min(a + b, len(enc))), b, seq_len, cfg.decoder_start_token_id)
            s, w = step(trainer.model, loss_fn, state["params"],
                        {k: jax.device_put(v, trainer.batch_sharding) for k, v in batch.items()})
            nll, weight = nll + float(s), weight + float(w)
    host_params = jax.device_get(state["params"])  # generation is a one-device loop, as train.sample
    max_new = args.eval_max_new_tokens or max(len(t) for t in tgt)
    hyps = ev.generate_texts(trainer.model, host_params, tok, enc, seq_len=max(len(r) for r in enc), batch_size=b,
                             max_new_tokens=max_new, progress=progress)
    metrics = {"eval_loss": nll / max(weight, 1.0), **{f"eval_{k}": v for k, v in ev.text_metrics(hyps, refs).items()}}
    return metrics, [{"input": i, "target": t, "prediction": h} for i, t, h in zip(inputs, refs, hyps)]


@functools.cache
def _eval_step():
    """The jitted teacher-forced eval loss (compiled once per shape; model and loss are static)."""
    import jax

    return jax.jit(_eval_sums, static_argnums=(0, 1))


# --------------------------------------------------------------------------- the loop


def _finetune(args, plan, train) -> dict:
    import jax
    from tqdm import tqdm

    from zoo.checkpoint import Checkpointer
    from zoo.evaluate import write_run_metadata

    task, cfg, mesh, out, seq_len = args.task, plan["cfg"], plan["mesh"], plan["out"], plan["seq_len"]
    lock = plan["lock"]
    with open(os.path.join(out, "args.json"), "w") as f:
        json.dump({**vars(args), "out": out}, f, indent=1)
    write_run_metadata(out, cfg, plan["tokenizer"])

    n_train = len(plan["data"]["train"][0])
    b = args.batch_size
    steps_per_epoch = math.ceil(n_train / b)  # the last batch is topped up with empty rows (no weight)
    total = args.epochs * steps_per_epoch
    opt = train.OptimConfig(lr=args.lr, warmup_steps=args.warmup_steps, decay_steps=args.decay_steps or total,
                            min_lr_ratio=args.min_lr_ratio, weight_decay=args.weight_decay, b1=args.b1, b2=args.b2,
                            eps=args.eps, clip_norm=args.clip_norm)
    t0 = time.time()
    trainer = train.make_trainer(cfg, mesh, opt, objective=OBJECTIVE[task], batch_size=b, seq_len=seq_len,
                                 grad_accum=args.grad_accum, z_loss=args.z_loss)
    state = train.init_state(trainer, mesh, args.seed)
    if plan["params"] is not None:
        print(f"initialising from {args.init}: ", end="")
        state = _load_into(state, plan["params"], trainer, mesh, opt, train)
    n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    has_eval = bool(plan["data"]["eval"][0])
    print(f"fine-tuning {cfg.name} ({getattr(cfg, 'architecture', cfg.hf_architecture)}, {n_params / 1e6:.2f}M "
          f"params) for {task}: {n_train} examples, {args.epochs} epochs x {steps_per_epoch} steps of {b} rows x "
          f"{seq_len} tokens; step compiled in {time.time() - t0:.1f}s")

    if task == "classify":
        rows, labels = plan["data"]["train"]

        def make_batch(idx):
            return _classify_batch(rows, labels, idx, b, seq_len)
    else:
        enc, tgt = plan["data"]["train"][:2]

        def make_batch(idx):
            return _seq2seq_batch(enc, tgt, idx, b, seq_len, cfg.decoder_start_token_id)

    log = train.MetricsLog(out)
    ckpt = Checkpointer(os.path.join(out, "checkpoints"), keep=args.keep_checkpoints)
    rng = np.random.default_rng(args.seed)
    history, epochs, losses = [], [], []
    bar = tqdm(total=total, disable=args.no_progress, unit="step", dynamic_ncols=True)
    step = 0
    try:
        for epoch in range(1, args.epochs + 1):
            order = rng.permutation(n_train)
            records = []
            last = time.time()
            with train.mesh_context(mesh):
                for s in range(steps_per_epoch):
                    batch = make_batch(order[s * b:(s + 1) * b])
                    state, metrics = trainer.step(state, {k: jax.device_put(v, trainer.batch_sharding)
                                                          for k, v in batch.items()})
                    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    step += 1
                    now = time.time()
                    record = {"step": step, "epoch": epoch, "loss": m["loss"], "learning_rate": m["learning_rate"],
                              "grad_norm": m["grad_norm"], "tokens_per_second": m["tokens"] / max(now - last, 1e-9),
                              "accuracy": m["accuracy"], "targets": m["targets"]}
                    last = now
                    records.append(record)
                    losses.append(m["loss"])
                    if s < steps_per_epoch - 1 and step % args.log_every == 0:
                        log.write(record)
                    bar.update(1)
                    bar.set_postfix(epoch=epoch, loss=f"{m['loss']:.3f}")
            weight = sum(r["targets"] for r in records)
            summary = {"epoch": epoch, "step": step, "train_loss": sum(r["loss"] * r["targets"] for r in records)
                       / max(weight, 1.0), "train_accuracy": sum(r["accuracy"] * r["targets"] for r in records)
                       / max(weight, 1.0)}
            if has_eval:
                metrics, predictions = _evaluate(task, trainer, state, plan, args, train)
                summary.update(metrics)
                with open(os.path.join(out, "eval_predictions.jsonl"), "w") as f:
                    f.writelines(json.dumps(p) + "\n" for p in predictions)
            records[-1].update({k: v for k, v in summary.items() if k not in ("epoch", "step")})
            log.write(records[-1])  # the epoch's last step carries its eval figures
            ckpt.save(step, state, {"epoch": epoch})
            epochs.append(summary)
            history.extend(records)
            bar.write(_epoch_line(summary, args.epochs))
    finally:
        bar.close()
        ckpt.close()
        log.close()
    train.plot_loss(history, os.path.join(out, "loss.png"))
    figure = os.path.join(out, "accuracy.png" if task == "classify" else "scores.png")
    plot_curves(history, epochs, figure, task=task, steps_per_epoch=steps_per_epoch)
    print(f"curves in {figure}; metrics in {os.path.join(out, 'metrics.jsonl')}")
    lock.release()
    return {"task": task, "out": out, "epochs": epochs, "losses": losses, "steps": step}


def _epoch_line(s: dict, epochs: int) -> str:
    line = f"epoch {s['epoch']}/{epochs}: train loss {s['train_loss']:.4f} accuracy {s['train_accuracy']:.4f}"
    if "eval_loss" in s:
        line += f" | eval loss {s['eval_loss']:.4f}"
        line += "".join(f" {k[5:]} {s[k]:.4f}" for k in ("eval_accuracy", "eval_f1") if k in s)
        line += "".join(f" {k[5:]} {s[k]:.2f}" for k in ("eval_bleu", "eval_rouge1", "eval_rouge2", "eval_rougeL")
                        if k in s)
    return line


def plot_curves(history: list[dict], epochs: list[dict], path: str, *, task: str, steps_per_epoch: int) -> None:
    """Train and eval curves by epoch: accuracy (classify) or BLEU/ROUGE-L (seq2seq), and the losses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
