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
import math
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import zoo
from zoo import registry
from zoo.argtypes import non_negative_float, positive_int
from zoo.checkpoint import Checkpointer
from zoo.data import STDLIB, DocumentSource, decode_known, find_files, frame, pad_rows, read_jsonl
from zoo.eval import class_logits, classification_metrics, cross_entropy, generate_texts, perplexity, text_metrics
from zoo.hf.convert import copy_side_files
from zoo.inference import generate
from zoo.paths import check_new_dir, check_writable_parent, open_for_writing, resolve, staged_dir
from zoo.pretrained import (
    EvalError,
    check_vocab,
    find_tokenizer,
    is_hf_dir,
    is_run_dir,
    load_pretrained,
    write_run_metadata,
)

PROG = "python -m zoo"
DTYPES = ("float32", "bfloat16", "float16")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples' line breaks and appends a flag's default to its help, once: not
    when the help already states one, nor for a default of None or a boolean switch."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (not action.option_strings or default is None or default is argparse.SUPPRESS
                or isinstance(default, bool) or "default" in text.lower()):
            return text
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """Bad flags are one line on stderr, `python -m zoo <cmd>: error: ...`, and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def unit_interval(text: str) -> float:
    """A number in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:  # NaN fails too
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def _model_flags(p, *, dtype_default="float32") -> None:
    p.add_argument("--model", required=True, metavar="DIR",
                   help="HF checkpoint dir (config.json + safetensors) or zoo run dir (train.py --out, convert)")
    p.add_argument("--tokenizer", default=None, metavar="FILE",
                   help="tokenizer.json or sentencepiece .model (default: the one in --model)")
    p.add_argument("--dtype", choices=DTYPES, default=dtype_default, help="compute and parameter dtype")


def build_parser() -> argparse.ArgumentParser:
    """The `python -m zoo` parser: one subcommand per action, each with its own --help."""
    p = _Parser(prog=PROG, description=__doc__.split("\n\n")[0],
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]), formatter_class=_Formatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{generate,convert,eval}")

    g = sub.add_parser(
        "generate", help="generate text from prompts (KV-cache decoding, zoo.generate)", formatter_class=_Formatter,
        description="Generates continuations of each --prompt with zoo.generate and prints them.\n\n"
                    "Decoders print prompt + continuation; T5 prints its output. Generation stops at the\n"
                    "tokenizer's end-of-text token (T5: the model's eos). A decoder prompt longer than the\n"
                    "model's positions less --max-new-tokens keeps its last tokens (said on stderr; the\n"
                    "printed text then starts at the kept part).\n\n"
                    "  python -m zoo generate --model runs/default --prompt 'def ' --max-new-tokens 64\n"
                    "  python -m zoo generate --model gpt2-dir --prompt 'Hello' --prompt 'The sky' \\\n"
                    "      --temperature 0.8 --top-p 0.95 --num-return-sequences 2 --seed 1")
    _model_flags(g)
    g.add_argument("--prompt", action="append", required=True,
                   help="a prompt (repeat the flag for a batch of prompts of different lengths)")
    g.add_argument("--max-new-tokens", type=positive_int, default=64, help="tokens generated per sequence")
    g.add_argument("--temperature", type=non_negative_float, default=0.0, help="sampling temperature; 0 is greedy")
    g.add_argument("--top-k", type=positive_int, default=None,
                   help="sample among the k most likely tokens (more than the vocabulary: all of them)")
    g.add_argument("--top-p", type=unit_interval, default=None,
                   help="nucleus sampling, in (0, 1]: the smallest set with this mass")
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
                    "model.safetensors (zoo.to_hf) and the tokenizer, which transformers loads.\n"
                    "OUT must not exist yet or be an empty dir, and must not overlap SOURCE; it appears only\n"
                    "once complete. SOURCE is only read.\n\n"
                    "  python -m zoo convert gpt2-hf/ runs/gpt2-zoo\n"
                    "  python -m zoo convert runs/default exported-hf/")
    c.add_argument("source", metavar="SOURCE", help="an HF checkpoint dir or a zoo run dir (only read)")
    c.add_argument("out", metavar="OUT", help="the dir to write: new or empty, outside SOURCE")
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
    e.add_argument("--predictions", default=None, metavar="FILE",
                   help="also write per-example predictions (JSONL; perplexity: one record per document)")
    e.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    e.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return p


# ---------------------------------------------------------------------------------- paths
#
# Every path is checked and made absolute once, here (zoo.paths.resolve: orbax misreads a
# relative checkpoint path); messages name it as the user typed it, with its flag.


def _input_dir(typed: str, flag: str) -> Path:
    path = resolve(typed)
    if not path.exists():
        raise EvalError(f"{flag} {typed} does not exist")
    if not path.is_dir():
        raise EvalError(f"{flag} {typed} is a file, not a directory")
    if not os.access(path, os.R_OK | os.X_OK):
        raise EvalError(f"{flag} {typed}: permission denied")
    return path


def _model_dir(typed: str, flag: str = "--model") -> Path:
    path = _input_dir(typed, flag)
    if not (is_hf_dir(path) or is_run_dir(path)):
        raise EvalError(f"{flag} {typed} is neither an HF checkpoint dir (config.json + safetensors) nor a zoo run "
                        "dir (checkpoints/ with args.json or zoo_config.json)")
    return path


def _input_file(typed: str, flag: str) -> Path:
    path = resolve(typed)
    if not path.exists():
        raise EvalError(f"{flag} {typed} does not exist")
    if path.is_dir():
        raise EvalError(f"{flag} {typed} is a directory, not a file")
    if not os.access(path, os.R_OK):
        raise EvalError(f"{flag} {typed}: permission denied")
    return path


def _data_files(typed: list[str], flag: str = "--data") -> list[str]:
    """The data files of --data (files, or dirs searched recursively), absolute; each one readable."""
    out = []
    for t in typed:
        path = resolve(t)
        if t != STDLIB:
            if not path.exists():
                raise EvalError(f"{flag} {t} does not exist")
            if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
                raise EvalError(f"{flag} {t}: permission denied")
        for f in find_files([t]):  # named as typed in its messages
            if not os.access(f, os.R_OK):
                raise EvalError(f"{flag} {t}: cannot read {f} (permission denied)")
            out.append(str(resolve(f)))
    return out


def _output_file(typed: str, flag: str, inputs=()) -> Path:
    """`typed` absolute, once it is known that it can be written (checked before any work) and is
    none of `inputs`; the file itself is only opened when its content is ready."""
    path = resolve(typed)
    if path.is_dir():
        raise EvalError(f"{flag} {typed} is a directory; pass a file path")
    check_writable_parent(path, flag=flag)
    if path.exists():
        if not os.access(path, os.W_OK):
            raise EvalError(f"{flag} {typed}: permission denied")
        for src in inputs:
            if os.path.exists(src) and os.path.samefile(path, src):
                raise EvalError(f"{flag} {typed} is an input ({src}); pass another file")
    return path


def _tokenizer_name(args) -> str:
    return f"--tokenizer {args.tokenizer}" if args.tokenizer else f"in --model {args.model}"


def _load(args):
    """Checks --model and --tokenizer, loads them, and refuses a tokenizer that does not fit the model."""
    model_dir = _model_dir(args.model)
    tok_file = _input_file(args.tokenizer, "--tokenizer") if args.tokenizer else None
    pre = load_pretrained(model_dir, dtype=args.dtype, tokenizer=tok_file and str(tok_file))
    if pre.tokenizer is None:
        raise EvalError(f"--model {args.model}: no tokenizer (tokenizer.json or a sentencepiece .model); "
                        "pass --tokenizer")
    check_vocab(pre.tokenizer, pre.cfg, model=f"--model {args.model}", tokenizer_name=_tokenizer_name(args))
    return pre


# ------------------------------------------------------------------------------ generate


def cmd_generate(args) -> int:
    """`generate`: prints the outputs of zoo.generate for each prompt."""
    pre = _load(args)
    cfg, tok = pre.cfg, pre.tokenizer
    family = registry.of(cfg)
    if not family.generates:
        raise EvalError(f"generate needs a decoder or an encoder-decoder (T5); --model {args.model} is a "
                        f"{cfg.family} {family.kind}")
    encdec = family.kind == "encoder-decoder"
    positions = cfg.max_seq_len
    if not encdec and args.max_new_tokens >= positions:
        raise EvalError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt: --model {args.model} "
                        f"has {positions} positions for prompt + new tokens; pass at most {positions - 1}")
    # Decoders keep the prompt's last tokens (the continuation follows the prompt's end) and leave
    # room for the new tokens; encoder-decoder inputs keep their first max_seq_len tokens (+ eos), as HF truncates.
    room = positions if encdec else positions - args.max_new_tokens
    rows, lengths = [], []
    for i, prompt in enumerate(args.prompt, 1):
        ids = frame(tok, cfg, prompt, max_len=sys.maxsize)
        if not ids:
            raise EvalError(f"prompt {i} ({prompt!r}) encodes to no tokens")
        lengths.append(len(ids))
        if len(ids) > room:
            if encdec:
                ids = ids[: room - 1] + [cfg.eos_token_id]
                why = f"encoder inputs are cut at the model's max_seq_len {positions}"
            else:
                ids = ids[-room:]
                why = (f"--model {args.model} has {positions} positions, {args.max_new_tokens} of them for "
                       "--max-new-tokens")
            print(f"{PROG} generate: note: prompt {i} is {lengths[-1]} tokens; kept its "
                  f"{'first' if encdec else 'last'} {len(ids)} ({why})", file=sys.stderr)
        rows.append(ids)
    ids, mask = pad_rows(rows, max(len(r) for r in rows))
    stop = cfg.eos_token_id if encdec else tok.eos_id
    t0 = time.time()
    new = generate(pre.model, pre.params, ids, mask, max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                       stop_tokens=() if stop is None else (stop,), num_return_sequences=args.num_return_sequences,
                       vocab_limit=tok.vocab_size)  # never sample an id the tokenizer cannot decode
    new = np.asarray(new)
    print(f"generated {new.shape[0]} x {new.shape[1]} tokens in {time.time() - t0:.2f}s (compilation included)",
          file=sys.stderr)
    n = args.num_return_sequences
    outputs = []
    for row in new:
        row = [int(t) for t in row]
        outputs.append(row[: row.index(stop)] if stop is not None and stop in row else row)
    for r, row in enumerate(outputs):
        p = r // n
        prompt, kept = args.prompt[p], len(rows[p])
        cut = not encdec and kept < lengths[p]
        completion = decode_known(tok, row)
        # a cut prompt is shown as the model saw it: its kept tokens, decoded
        text = completion if encdec else (tok.decode(rows[p]) if cut else prompt) + completion
        if args.jsonl:
            print(json.dumps({"prompt": prompt, "sample": r % n, "completion": completion, "text": text,
                              "token_ids": row, "prompt_tokens": lengths[p], "prompt_tokens_kept": kept}))
        else:
            note = f" (cut to its last {kept} of {lengths[p]} tokens)" if cut else ""
            print(f"=== prompt {p + 1}/{len(args.prompt)}{note}, sample {r % n + 1}/{n} ===")
            print(text)
    return 0


# ------------------------------------------------------------------------------- convert


def cmd_convert(args) -> int:
    """`convert`: HF dir -> zoo checkpoint dir, or zoo run dir -> HF dir. SOURCE is only read; OUT
    must be new or empty and outside SOURCE (refused before anything is loaded), and appears only
    once complete."""
    src = _input_dir(args.source, "SOURCE")
    from_hf = is_hf_dir(src)
    if not from_hf and not is_run_dir(src):
        raise EvalError(f"SOURCE {args.source} is neither an HF checkpoint dir (config.json) nor a zoo run dir "
                        "(checkpoints/ with args.json or zoo_config.json)")
    out = check_new_dir(args.out, flag="OUT", sources=[src])
    if from_hf:
        model, params = zoo.from_hf(src, dtype=jnp.dtype(args.dtype or "float32"))
        tok = find_tokenizer(src)
        check_vocab(tok, model.cfg, model=f"SOURCE {args.source}", tokenizer_name=f"in SOURCE {args.source}")
        with staged_dir(out) as tmp:  # a failure leaves nothing at OUT
            ckpt = Checkpointer(tmp / "checkpoints", keep=1)
            ckpt.save(0, {"step": jnp.zeros((), jnp.int32), "params": params}, {})
            ckpt.close()
            copy_side_files(src, tmp)
            write_run_metadata(tmp, model.cfg, tok)
        n = sum(x.size for x in jax.tree.leaves(params))
        print(f"{args.source} ({model.cfg.hf_architecture}, {n / 1e6:.2f}M params) -> zoo checkpoint {args.out}"
              f"{'' if tok else ' (no tokenizer found)'}")
        return 0
    pre = load_pretrained(src, dtype=args.dtype)
    check_vocab(pre.tokenizer, pre.cfg, model=f"SOURCE {args.source}", tokenizer_name=f"in SOURCE {args.source}")
    zoo.to_hf(pre.model, pre.params, out, tokenizer=pre.tokenizer, side_files_from=src)
    print(f"{args.source} ({pre.cfg.name}) -> HF {pre.cfg.hf_architecture} checkpoint {args.out}")
    return 0


# ---------------------------------------------------------------------------------- eval


def _is_classifier(cfg) -> bool:
    """True for a sequence-classification head (an encoder's eval task depends on its head)."""
    return getattr(cfg, "architecture", "").endswith("ForSequenceClassification")


def _records(files, fields):
    return [r for f in files for r in read_jsonl(f, fields)]


def cmd_eval(args) -> int:
    """`eval`: perplexity, BLEU/ROUGE or accuracy/F1, printed (or as JSON)."""
    # every path is checked before the model loads: a bad --data or --predictions costs nothing
    files = _data_files(args.data)
    if args.predictions:
        inputs = files + ([args.tokenizer] if args.tokenizer else [])
        predictions_path = _output_file(args.predictions, "--predictions", inputs=inputs)
    pre = _load(args)
    cfg, tok = pre.cfg, pre.tokenizer
    task = args.task
    if task == "auto":  # the family's eval task; an encoder's depends on its head
        task = registry.of(cfg).eval_task or ("classify" if _is_classifier(cfg) else None)
        if task is None:
            raise EvalError(f"no evaluation for a {getattr(cfg, 'architecture', cfg.family)} model; "
                            "fine-tune it first (train.py --task classify)")
    max_len = min(args.seq_len or 1024, cfg.max_seq_len)
    progress = not args.no_progress

    if task == "perplexity":
        source = DocumentSource(files)
        docs = [tok.encode(source[i]) for i in range(len(source))]
        metrics = perplexity(pre.model, pre.params, docs, seq_len=max_len, batch_size=args.batch_size,
                                progress=progress, per_document=True)
        per_doc = metrics.pop("per_document")
        metrics["documents"] = len(docs)
        predictions = [{"document": i, "file": source.files[source.index[i][0]], **rec}
                       for i, rec in enumerate(per_doc)]
        line = (f"perplexity {metrics['perplexity']:.4f} (mean NLL {metrics['nll']:.4f} nats over "
                f"{metrics['tokens']} predicted tokens, {len(docs)} documents, {metrics['windows']} windows)")
    elif task == "classify":
        if not _is_classifier(cfg):
            raise EvalError(f"classify needs a sequence classifier; --model {args.model} is a "
                            f"{getattr(cfg, 'architecture', cfg.family)}")
        records = _records(files, ("text", "label"))
        labels = np.asarray([r["label"] for r in records])
        bad = labels[(labels < 0) | (labels >= cfg.num_labels)]
        if bad.size:
            raise EvalError(f"label {bad[0]} is outside the model's {cfg.num_labels} classes")
        rows = [frame(tok, cfg, r["text"], max_len) for r in records]
        logits = class_logits(pre.model, pre.params, rows, seq_len=max(len(r) for r in rows),
                              batch_size=args.batch_size, progress=progress)
        preds = logits.argmax(axis=1)
        metrics = {**classification_metrics(preds, labels), "loss": cross_entropy(logits, labels),
                   "examples": len(records)}
        predictions = [{"label": int(y), "prediction": int(p)} for y, p in zip(labels, preds)]
        line = (f"accuracy {metrics['accuracy']:.4f}  f1 {metrics['f1']:.4f} (macro)  loss {metrics['loss']:.4f} "
                f"({len(records)} examples)")
    else:
        if registry.of(cfg).kind != "encoder-decoder":
            raise EvalError(f"seq2seq needs an encoder-decoder (T5); --model {args.model} is a {cfg.family} model")
        records = _records(files, ("input", "target"))
        inputs = [frame(tok, cfg, r["input"], max_len) for r in records]
        hyps = generate_texts(pre.model, pre.params, tok, inputs, seq_len=max(len(r) for r in inputs),
                              batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, progress=progress)
        refs = [r["target"] for r in records]
        metrics = {**text_metrics(hyps, refs), "examples": len(records)}
        predictions = [{"input": r["input"], "target": r["target"], "prediction": h} for r, h in zip(records, hyps)]
        line = (f"bleu {metrics['bleu']:.2f}  rouge1 {metrics['rouge1']:.2f}  rouge2 {metrics['rouge2']:.2f}  "
                f"rougeL {metrics['rougeL']:.2f} ({len(records)} examples)")
    metrics["task"] = task
    if not all(math.isfinite(v) for v in metrics.values() if isinstance(v, float)):
        raise EvalError(f"the metrics are not finite ({line}); the model's weights hold NaN or inf?")
    if args.predictions:
        with open_for_writing(predictions_path, flag="--predictions") as f:
            f.writelines(json.dumps(p) + "\n" for p in predictions)
    print(json.dumps(metrics) if args.json else line)
    return 0


# ---------------------------------------------------------------------------------- main


COMMANDS = {"generate": cmd_generate, "convert": cmd_convert, "eval": cmd_eval}


def _one_line(text: str) -> str:
    return " ".join(text.split("\n")).strip()


def main(argv: list[str] | None = None) -> int:
    """Runs one subcommand; returns the exit status (2 with one line on stderr for bad input)."""
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except OSError as e:  # a file that vanished or cannot be read or written: name it, no traceback
        where = f"{e.filename}: " if e.filename else ""
        print(f"{PROG} {args.command}: error: {where}{_one_line(e.strerror or str(e))}", file=sys.stderr)
        return 2
    except (EvalError, ValueError) as e:  # CheckpointError, DataError and OutputError are ValueErrors
        print(f"{PROG} {args.command}: error: {_one_line(str(e))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
