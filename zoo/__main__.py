"""The zoo's command line: generate text, convert checkpoints, evaluate models.

    python -m zoo generate --model DIR --prompt "Once upon a time" --max-new-tokens 64
    python -m zoo convert HF_DIR RUN_DIR        # HF checkpoint -> zoo (orbax) checkpoint dir
    python -m zoo convert RUN_DIR HF_DIR        # zoo run / checkpoint dir -> HF dir transformers loads
    python -m zoo eval --model DIR --data test.txt          # perplexity (causal LMs)
    python -m zoo eval --model DIR --data dev.jsonl         # BLEU/ROUGE (T5) or accuracy/F1 (classifiers)

DIR is a Hugging Face checkpoint dir (config.json + *.safetensors, and tokenizer.json
or a sentencepiece .model) or a zoo run dir (what `train.py --out DIR` writes, or
`convert` / fine-tuning). Bad input exits with status 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from zoo.argtypes import positive_int

PROG = "python -m zoo"
DTYPES = ("float32", "bfloat16", "float16")


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the examples' line breaks and appends defaults to each flag's help."""


def _model_flags(p, *, dtype_default="float32") -> None:
    p.add_argument("--model", required=True, metavar="DIR",
                   help="HF checkpoint dir (config.json + safetensors) or zoo run dir (train.py --out, convert)")
    p.add_argument("--tokenizer", default=None, metavar="FILE",
                   help="tokenizer.json or sentencepiece .model (default: the one in --model)")
    p.add_argument("--dtype", choices=DTYPES, default=dtype_default, help="compute and parameter dtype")


def build_parser() -> argparse.ArgumentParser:
    """The `python -m zoo` parser: one subcommand per action, each with its own --help."""
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]), formatter_class=_Formatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{generate,convert,eval}")

    g = sub.add_parser(
        "generate", help="generate text from prompts (KV-cache decoding, zoo.generate)", formatter_class=_Formatter,
        description="Generates continuations of each --prompt with zoo.generate and prints them.\n\n"
                    "Decoders print prompt + continuation; T5 prints its output. Generation stops at the\n"
                    "tokenizer's end-of-text token (T5: the model's eos).\n\n"
                    "  python -m zoo generate --model runs/default --prompt 'def ' --max-new-tokens 64\n"
                    "  python -m zoo generate --model gpt2-dir --prompt 'Hello' --prompt 'The sky' \\\n"
                    "      --temperature 0.8 --top-p 0.95 --num-return-sequences 2 --seed 1")
    _model_flags(g)
    g.add_argument("--prompt", action="append", required=True,
                   help="a prompt (repeat the flag for a batch of prompts of different lengths)")
    g.add_argument("--max-new-tokens", type=positive_int, default=64, help="tokens generated per sequence")
    g.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 is greedy")
    g.add_argument("--top-k", type=positive_int, default=None, help="sample among the k most likely tokens")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling: the smallest set with this mass")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (same seed, same output)")
    g.add_argument("--num-return-sequences", type=positive_int, default=1, help="samples per prompt")
    g.add_argument("--jsonl", action="store_true",
                   help="print one JSON object per output (prompt, sample, completion, text, token_ids)")

    c = sub.add_parser(
        "convert", help="HF checkpoint <-> zoo checkpoint dir", formatter_class=_Formatter,
        description="Converts between a Hugging Face checkpoint and a zoo checkpoint dir; the direction\n"
                    "follows SOURCE. HF -> zoo writes OUT/checkpoints/0/state (orbax: params),\n"
                    "OUT/zoo_config.json and the tokenizer. zoo -> HF reads the newest checkpoint of a run\n"
                    "(train.py --out, fine-tuning, or a converted dir) and writes OUT/config.json +\n"
                    "model.safetensors (zoo.to_hf) and the tokenizer, which transformers loads.\n\n"
                    "  python -m zoo convert gpt2-hf/ runs/gpt2-zoo\n"
                    "  python -m zoo convert runs/default exported-hf/")
    c.add_argument("source", help="an HF checkpoint dir or a zoo run dir")
    c.add_argument("out", help="the dir to write (HF -> zoo: must not hold checkpoints yet)")
    c.add_argument("--dtype", choices=DTYPES, default=None,
                   help="parameter dtype to write (default: float32 for HF -> zoo, the run's for zoo -> HF)")

    e = sub.add_parser(
        "eval", help="perplexity, BLEU/ROUGE or accuracy/F1 of a model on data files", formatter_class=_Formatter,
        description="Evaluates a model; the task follows the model unless --task says otherwise:\n"
                    "  causal LMs (GPT-2, Llama, ...): perplexity = exp(mean next-token NLL) on text files\n"
                    "      (.txt etc.: one document per file; .jsonl: a 'text' field per line);\n"
                    "  T5: greedy outputs on JSONL lines {\"input\", \"target\"}, scored with BLEU (sacrebleu)\n"
                    "      and ROUGE-1/2/L (rouge-score);\n"
                    "  BertForSequenceClassification: accuracy and macro F1 on JSONL lines {\"text\", \"label\"}.\n\n"
                    "  python -m zoo eval --model runs/default --data held_out.txt\n"
                    "  python -m zoo eval --model runs/t5-ft --data dev.jsonl --predictions preds.jsonl")
    _model_flags(e)
    e.add_argument("--data", nargs="+", required=True, help="data files or directories")
    e.add_argument("--task", choices=("auto", "perplexity", "seq2seq", "classify"), default="auto",
                   help="what to measure (auto: from the model's family)")
    e.add_argument("--seq-len", type=positive_int, default=None,
                   help="window / truncation length in tokens (default: the model's, at most 1024)")
    e.add_argument("--batch-size", type=positive_int, default=8, help="rows per forward pass")
    e.add_argument("--max-new-tokens", type=positive_int, default=64, help="seq2seq: output tokens per example")
    e.add_argument("--predictions", default=None, metavar="FILE", help="also write per-example predictions (JSONL)")
    e.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    e.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return p


# ------------------------------------------------------------------------------ generate


def cmd_generate(args) -> int:
    """`generate`: prints the outputs of zoo.generate for each prompt."""
    import numpy as np

    import zoo
    from zoo.evaluate import EvalError, frame, load_pretrained, pad_rows

    pre = load_pretrained(args.model, dtype=args.dtype, tokenizer=args.tokenizer)
    cfg, tok = pre.cfg, pre.tokenizer
    if tok is None:
        raise EvalError(f"{args.model}: no tokenizer (tokenizer.json or a sentencepiece .model); pass --tokenizer")
    if cfg.family not in ("gpt2", "llama", "moe", "t5"):
        raise EvalError(f"generate needs a decoder or T5; {args.model} is a {cfg.family} model")
    rows = [frame(tok, cfg, p, max_len=cfg.max_seq_len) for p in args.prompt]
    for i, row in enumerate(rows):
        if not row:
            raise EvalError(f"prompt {i} ({args.prompt[i]!r}) encodes to no tokens")
    ids, mask = pad_rows(rows, max(len(r) for r in rows))
    is_t5 = cfg.family == "t5"
    stop = cfg.eos_token_id if is_t5 else tok.eos_id
    t0 = time.time()
    new = zoo.generate(pre.model, pre.params, ids, mask, max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                       stop_tokens=() if stop is None else (stop,), num_return_sequences=args.num_return_sequences)
    new = np.asarray(new)
    print(f"generated {new.shape[0]} x {new.shape[1]} tokens in {time.time() - t0:.2f}s (compilation included)",
          file=sys.stderr)
    n = args.num_return_sequences
    for r, row in enumerate(new):
        row = [int(t) for t in row]
        if stop is not None and stop in row:
            row = row[: row.index(stop)]
        prompt = args.prompt[r // n]
        completion = tok.decode(row)
        text = completion if is_t5 else prompt + completion
        if args.jsonl:
            print(json.dumps({"prompt": prompt, "sample": r % n, "completion": completion, "text": text,
                              "token_ids": row}))
        else:
            print(f"=== prompt {r // n + 1}/{len(args.prompt)}, sample {r % n + 1}/{n} ===")
            print(text)
    return 0


# ------------------------------------------------------------------------------- convert


def cmd_convert(args) -> int:
    """`convert`: HF dir -> zoo checkpoint dir, or zoo run dir -> HF dir."""
    import shutil

    import jax
    import jax.numpy as jnp

    import zoo
    from zoo.evaluate import EvalError, find_tokenizer, is_hf_dir, is_run_dir, load_pretrained, write_run_metadata

    src, out = Path(args.source), Path(args.out)
    if not src.is_dir():
        raise EvalError(f"source dir does not exist: {src}")
    if is_hf_dir(src):
        from zoo.checkpoint import Checkpointer

        if (out / "checkpoints").exists():
            raise EvalError(f"{out} already holds checkpoints; pass a new dir")
        model, params = zoo.from_hf(src, dtype=jnp.dtype(args.dtype or "float32"))
        tok = find_tokenizer(src)
        ckpt = Checkpointer(out / "checkpoints", keep=1)
        ckpt.save(0, {"step": jnp.zeros((), jnp.int32), "params": params}, {})
        ckpt.close()
        write_run_metadata(out, model.cfg, tok)
        n = sum(x.size for x in jax.tree.leaves(params))
        print(f"{src} ({model.cfg.hf_architecture}, {n / 1e6:.2f}M params) -> zoo checkpoint {out}"
              f"{'' if tok else ' (no tokenizer found)'}")
        return 0
    if not is_run_dir(src):
        raise EvalError(f"{src} is neither an HF checkpoint dir (config.json) nor a zoo run dir (checkpoints/)")
    pre = load_pretrained(src, dtype=args.dtype)
    zoo.to_hf(pre.model, pre.params, out)
    if pre.tokenizer is not None:  # beside the weights, under the name HF tools look for
        shutil.copyfile(pre.tokenizer.path, out / ("tokenizer.json" if pre.tokenizer.path.endswith(".json")
                                                   else "tokenizer.model"))
    print(f"{src} ({pre.cfg.name}) -> HF {pre.cfg.hf_architecture} checkpoint {out}")
    return 0


# ---------------------------------------------------------------------------------- eval


def _records(paths, fields):
    from zoo.data import find_files
    from zoo.evaluate import read_jsonl

    return [r for f in find_files(paths) for r in read_jsonl(f, fields)]


def cmd_eval(args) -> int:
    """`eval`: perplexity, BLEU/ROUGE or accuracy/F1, printed (or as JSON)."""
    import numpy as np

    from zoo import data
    from zoo import evaluate as ev

    pre = ev.load_pretrained(args.model, dtype=args.dtype, tokenizer=args.tokenizer)
    cfg, tok = pre.cfg, pre.tokenizer
    if tok is None:
        raise ev.EvalError(f"{args.model}: no tokenizer (tokenizer.json or a sentencepiece .model); pass --tokenizer")
    task = args.task
    if task == "auto":
        if cfg.family in ev.DECODER_FAMILIES:
            task = "perplexity"
        elif cfg.family == "t5":
            task = "seq2seq"
        elif getattr(cfg, "architecture", "") == "BertForSequenceClassification":
            task = "classify"
        else:
            raise ev.EvalError(f"no evaluation for a {getattr(cfg, 'architecture', cfg.family)} model; "
                               "fine-tune it first (train.py --task classify)")
    max_len = min(args.seq_len or 1024, cfg.max_seq_len)
    progress = not args.no_progress
    predictions = []

    if task == "perplexity":
        source = data.DocumentSource(args.data)
        docs = [tok.encode(source[i]) for i in range(len(source))]
        metrics = ev.perplexity(pre.model, pre.params, docs, seq_len=max_len, batch_size=args.batch_size,
                                progress=progress)
        metrics["documents"] = len(docs)
        line = (f"perplexity {metrics['perplexity']:.4f} (mean NLL {metrics['nll']:.4f} nats over "
                f"{metrics['tokens']} predicted tokens, {len(docs)} documents, {metrics['windows']} windows)")
    elif task == "classify":
        if getattr(cfg, "architecture", "") != "BertForSequenceClassification":
            raise ev.EvalError(f"classify needs a sequence classifier; {args.model} is a "
                               f"{getattr(cfg, 'architecture', cfg.family)}")
        records = _records(args.data, ("text", "label"))
        labels = np.asarray([r["label"] for r in records])
        bad = labels[(labels < 0) | (labels >= cfg.num_labels)]
        if bad.size:
            raise ev.EvalError(f"label {bad[0]} is outside the model's {cfg.num_labels} classes")
        rows = [ev.frame(tok, cfg, r["text"], max_len) for r in records]
        logits = ev.class_logits(pre.model, pre.params, rows, seq_len=max(len(r) for r in rows),
                                 batch_size=args.batch_size, progress=progress)
        preds = logits.argmax(axis=1)
        metrics = {**ev.classification_metrics(preds, labels), "loss": ev.cross_entropy(logits, labels),
                   "examples": len(records)}
        predictions = [{"label": int(y), "prediction": int(p)} for y, p in zip(labels, preds)]
        line = (f"accuracy {metrics['accuracy']:.4f}  f1 {metrics['f1']:.4f} (macro)  loss {metrics['loss']:.4f} "
                f"({len(records)} examples)")
    else:
        if cfg.family != "t5":
            raise ev.EvalError(f"seq2seq needs a T5 model; {args.model} is a {cfg.family} model")
        records = _records(args.data, ("input", "target"))
        inputs = [ev.frame(tok, cfg, r["input"], max_len) for r in records]
        hyps = ev.generate_texts(pre.model, pre.params, tok, inputs, seq_len=max(len(r) for r in inputs),
                                 batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, progress=progress)
        refs = [r["target"] for r in records]
        metrics = {**ev.text_metrics(hyps, refs), "examples": len(records)}
        predictions = [{"input": r["input"], "target": r["target"], "prediction": h} for r, h in zip(records, hyps)]
        line = (f"bleu {metrics['bleu']:.2f}  rouge1 {metrics['rouge1']:.2f}  rouge2 {metrics['rouge2']:.2f}  "
                f"rougeL {metrics['rougeL']:.2f} ({len(records)} examples)")
    metrics["task"] = task
    if args.predictions and predictions:
        with open(args.predictions, "w") as f:
            f.writelines(json.dumps(p) + "\n" for p in predictions)
    print(json.dumps(metrics) if args.json else line)
    return 0


# ---------------------------------------------------------------------------------- main


COMMANDS = {"generate": cmd_generate, "convert": cmd_convert, "eval": cmd_eval}


def main(argv: list[str] | None = None) -> int:
    """Runs one subcommand; returns the exit status (2 with one line on stderr for bad input)."""
    args = build_parser().parse_args(argv)
    from zoo.evaluate import EvalError

    try:
        return COMMANDS[args.command](args)
    except (EvalError, FileNotFoundError, ValueError) as e:  # CheckpointError is a ValueError
        print(f"{PROG} {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
