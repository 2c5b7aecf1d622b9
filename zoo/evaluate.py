"""Evaluation: loading a model dir, framing text for each family, and the metrics.

A *model dir* is either a Hugging Face checkpoint (config.json + safetensors, with a
tokenizer.json or a sentencepiece .model beside it) or a zoo run directory: what
`train.py --out DIR` writes (args.json, tokenizer.model, checkpoints/<step>/state)
or what `python -m zoo convert` and fine-tuning write (zoo_config.json instead of
args.json). `load_pretrained` reads either into (model, params, tokenizer).

Metrics:
  * perplexity: exp(mean next-token NLL over every predicted token of every document;
    documents longer than the window are cut into consecutive windows, and the first
    token of each window has no target);
  * BLEU: sacrebleu's corpus BLEU (13a tokenisation, 0-100);
  * ROUGE-1/2/L: rouge-score's F-measure (Porter stemmer), averaged over examples, 0-100;
  * accuracy and F1 (macro over the classes seen in labels or predictions).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from functools import partial
from pathlib import Path
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model")
ZOO_CONFIG = "zoo_config.json"
DECODER_FAMILIES = ("gpt2", "llama", "moe")


class EvalError(ValueError):
    """Bad input to an evaluation or a model dir that cannot be used: reported as one line."""


# --------------------------------------------------------------------------- loading


@dataclasses.dataclass
class Pretrained:
    """A loaded model dir: the module, its params (host arrays), its tokenizer (or None)."""

    model: object
    params: dict
    tokenizer: object | None
    path: str
    kind: str  # "hf" or "run"

    @property
    def cfg(self):
        return self.model.cfg


def is_hf_dir(path) -> bool:
    """True when `path` holds an HF checkpoint (config.json)."""
    return (Path(path) / "config.json").is_file()


def is_run_dir(path) -> bool:
    """True when `path` is a zoo run directory (checkpoints/ and args.json or zoo_config.json)."""
    p = Path(path)
    return (p / "checkpoints").is_dir() and ((p / "args.json").is_file() or (p / ZOO_CONFIG).is_file())


def config_to_json(cfg) -> dict:
    """A zoo config as JSON: its class name and every field."""
    return {"class": type(cfg).__name__, "fields": dataclasses.asdict(cfg)}


def _tuples(value):
    # JSON turns tuples into lists; configs are hashed (jit static args), so undo it.
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def config_from_json(blob: dict):
    """The zoo config written by `config_to_json`."""
    from zoo import configs

    cls = getattr(configs, blob.get("class", ""), None)
    if cls is None or not dataclasses.is_dataclass(cls):
        raise EvalError(f"unknown zoo config class {blob.get('class')!r}")
    return cls(**{k: _tuples(v) for k, v in blob["fields"].items()})


def write_run_metadata(out, cfg, tokenizer=None) -> None:
    """Writes `<out>/zoo_config.json` and copies the tokenizer file beside it (keeping its name)."""
    import shutil

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / ZOO_CONFIG).write_text(json.dumps(config_to_json(cfg), indent=1) + "\n")
    if tokenizer is not None:
        src = Path(tokenizer.path)
        dst = out / (src.name if src.name in TOKENIZER_FILES else
                     ("tokenizer.json" if src.suffix == ".json" else "tokenizer.model"))
        if src.resolve() != dst.resolve():
            shutil.copyfile(src, dst)


def _config_from_train_args(run: Path, args: dict, tokenizer):
    """The config of a `train.py` pretraining run, rebuilt from its args.json as train.py built it."""
    import zoo
    from zoo.hf import config_from_hf

    name = args["model"]
    if name.endswith(".json") or os.path.isdir(name):
        path = os.path.join(name, "config.json") if os.path.isdir(name) else name
        if not os.path.isfile(path):
            raise EvalError(f"{run}/args.json: the run's --model {name} is gone; cannot rebuild its config")
        with open(path) as f:
            cfg = config_from_hf(json.load(f))
    else:
        cfg = zoo.config(name)
    overrides = {k: args[k] for k in ("dtype", "param_dtype", "remat") if args.get(k)}
    vocab = args.get("vocab_size")
    if vocab == "tokenizer":
        if tokenizer is None:
            raise EvalError(f"{run}: trained with --vocab-size tokenizer but its tokenizer is missing")
        overrides["vocab_size"] = -(-tokenizer.vocab_size // 128) * 128
    elif vocab:
        overrides["vocab_size"] = int(vocab)
    return cfg.replace(**overrides) if overrides else cfg


def latest_checkpoint(run) -> Path:
    """`<run>/checkpoints/<step>/state` of the newest complete checkpoint."""
    root = Path(run) / "checkpoints"
    steps = sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and (p / "state").is_dir()) \
        if root.is_dir() else []
    if not steps:
        raise EvalError(f"{root}: no complete checkpoint")
    return root / str(steps[-1]) / "state"


def restore_params(state_dir) -> dict:
    """The params subtree of a saved train state, as host numpy arrays.

    Only "params" is read (partial restore), so a checkpoint restores whatever the
    optimizer was, on any number of devices.
    """
    import orbax.checkpoint as ocp
    from absl import logging as absl_logging

    from zoo.paths import resolve

    state_dir = resolve(state_dir)  # orbax reads no metadata tree from a relative path
    ckpt = ocp.PyTreeCheckpointer()
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)  # orbax warns that the *step* metadata is not in this item dir
    try:
        meta = ckpt.metadata(state_dir)
    finally:
        absl_logging.set_verbosity(verbosity)
    tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else getattr(meta, "tree", None)
    if tree is None:
        raise EvalError(f"{state_dir}: no readable checkpoint metadata (not an orbax checkpoint?)")
    if "params" not in tree:
        raise EvalError(f"{state_dir}: the saved state has no 'params'")
    target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), tree["params"])
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
    args = ocp.args.PyTreeRestore(item={"params": target}, restore_args={"params": restore_args},
                                  partial_restore=True)
    return ckpt.restore(state_dir, args=args)["params"]


def find_tokenizer(path, hint: str | None = None):
    """The tokenizer of a model dir (tokenizer.json, tokenizer.model, spiece.model, *.model), or None."""
    root = Path(path)
    candidates = [root / name for name in TOKENIZER_FILES] + sorted(root.glob("*.model"))
    if hint:
        candidates.append(Path(hint))
    for file in candidates:
        if file.is_file():
            return load_tokenizer(file)
    return None


def load_tokenizer(path, *, name=None):
    """A `zoo.data.Tokenizer` of a file; one EvalError naming `name` (default: the path) if it cannot be read."""
    from zoo.data import Tokenizer

    try:
        return Tokenizer(path)
    except Exception as e:  # sentencepiece/tokenizers raise assorted types on a bad or unreadable file
        detail = " ".join(str(e).split()) or type(e).__name__
        raise EvalError(f"cannot load tokenizer {name or path}: {detail}") from None


def check_vocab(tokenizer, cfg, *, model: str = "the model", tokenizer_name: str | None = None) -> None:
    """Refuses a tokenizer whose ids can exceed the model's vocabulary (its embedding would be
    read out of range: NaN or garbage instead of an error)."""
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise EvalError(f"tokenizer {tokenizer_name or tokenizer.path} has {tokenizer.vocab_size} tokens but "
                        f"{model} has a vocabulary of {cfg.vocab_size}; pass the model's own tokenizer")


def load_pretrained(path, *, dtype: str | None = "float32", tokenizer: str | None = None) -> Pretrained:
    """Loads an HF checkpoint dir or a zoo run dir: (model, params, tokenizer).

    dtype: compute and param dtype (None keeps the run's config; HF checkpoints then
    load in float32). tokenizer: a tokenizer file overriding the one in the dir.
    """
    from zoo.paths import resolve

    root = resolve(path)  # absolute once, here: orbax misreads relative checkpoint paths; messages keep `path`
    if not root.is_dir():
        raise EvalError(f"model dir does not exist: {path}")
    tok = None
    if tokenizer:
        if not os.path.isfile(resolve(tokenizer)):
            raise EvalError(f"tokenizer file does not exist: {tokenizer}")
        tok = load_tokenizer(resolve(tokenizer), name=tokenizer)
    if is_hf_dir(root):
        import zoo

        model, params = zoo.from_hf(root, dtype=jnp.dtype(dtype or "float32"))
        return Pretrained(model, params, tok or find_tokenizer(root), str(root), "hf")
    if not is_run_dir(root):
        raise EvalError(f"{path} is neither an HF checkpoint dir (config.json + safetensors) nor a zoo run dir "
                        "(checkpoints/ with args.json or zoo_config.json)")
    import zoo

    if (root / ZOO_CONFIG).is_file():
        cfg = config_from_json(json.loads((root / ZOO_CONFIG).read_text()))
        tok = tok or find_tokenizer(root)
    else:
        args = json.loads((root / "args.json").read_text())
        tok = tok or find_tokenizer(root, hint=args.get("tokenizer"))
        cfg = _config_from_train_args(root, args, tok)
    if dtype:
        cfg = cfg.replace(dtype=dtype, param_dtype=dtype)
    params = restore_params(latest_checkpoint(root))
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.dtype(cfg.param_dtype)), params)
    return Pretrained(zoo.build(cfg), params, tok, str(root), "run")


# ------------------------------------------------------------------- framing text


@functools.lru_cache(maxsize=8)
def _vocab_lookup(path: str):
    if path.endswith(".json"):
        from tokenizers import Tokenizer as HFTokenizer

        return HFTokenizer.from_file(path).token_to_id
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=path)

    def lookup(piece):
        i = sp.piece_to_id(piece)
        return None if i == sp.unk_id() and piece != sp.id_to_piece(sp.unk_id()) else i

    return lookup


def token_id(tokenizer, *pieces: str) -> int | None:
    """Id of the first of `pieces` the tokenizer's vocabulary holds, or None."""
    lookup = _vocab_lookup(tokenizer.path)
    for piece in pieces:
        i = lookup(piece)
        if i is not None:
            return int(i)
    return None


def decode_known(tokenizer, ids: Iterable[int]) -> str:
    """Text of the ids the tokenizer knows. A model's vocabulary may be larger than its tokenizer's
    (padded to a multiple of 128); ids past the tokenizer's are left out (sentencepiece raises on them)."""
    return tokenizer.decode([int(t) for t in ids if 0 <= int(t) < tokenizer.vocab_size])


def frame(tokenizer, cfg, text: str, max_len: int, *, role: str = "input") -> list[int]:
    """Token ids of `text` as the model family expects them, at most `max_len` long.

    BERT inputs are [CLS] text [SEP] (when the vocabulary has them; truncation keeps
    both); T5 inputs and targets end with the model's eos (as HF's T5 tokenizer adds);
    decoder inputs are the plain tokens.
    """
    ids = list(tokenizer.encode(text))
    family = cfg.family
    if family == "bert" and role == "input":
        cls, sep = token_id(tokenizer, "[CLS]", "<s>"), token_id(tokenizer, "[SEP]", "</s>")
        head, tail = ([cls] if cls is not None else []), ([sep] if sep is not None else [])
        return head + ids[: max_len - len(head) - len(tail)] + tail
    if family == "t5":
        return ids[: max_len - 1] + [cfg.eos_token_id]
    return ids[:max_len]


def pad_rows(seqs: Sequence[Sequence[int]], length: int, rows: int | None = None):
    """Right-padded int32 rows: (ids [R, length], segment_ids [R, length], 1 on real tokens).

    `rows` pads the batch with empty rows (segment 0: no weight anywhere).
    """
    rows = len(seqs) if rows is None else rows
    ids = np.zeros((rows, length), np.int32)
    seg = np.zeros((rows, length), np.int32)
    for r, s in enumerate(seqs):
        s = list(s)[:length]
        ids[r, : len(s)] = s
        seg[r, : len(s)] = 1
    return ids, seg


def _batches(n: int, batch_size: int):
    return [(a, min(a + batch_size, n)) for a in range(0, n, batch_size)]


def _bar(total: int, desc: str, progress: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)


# ------------------------------------------------------------------------ perplexity


@partial(jax.jit, static_argnums=0)
def _nll_rows(model, params, ids_BT, seg_BT):
    """Summed next-token NLL and target count of each row: ([B], [B])."""
    from zoo.objectives import cross_entropy_sums, next_token_targets

    # one window per row, so positions simply count from 0
    positions_BT = jnp.broadcast_to(jnp.arange(ids_BT.shape[1], dtype=jnp.int32), ids_BT.shape)
    logits_BTV = model.apply({"params": params}, ids_BT, positions=positions_BT, segment_ids=seg_BT)
    targets_BT, valid_BT = next_token_targets(ids_BT, seg_BT)

    def row(logits_TV, targets_T, valid_T):
        _, sums = cross_entropy_sums(logits_TV[None], targets_T[None], valid_T[None])
        return sums["nll"], sums["weight"]

    return jax.vmap(row)(logits_BTV, targets_BT, valid_BT)


def windows(tokens: Sequence[int], length: int) -> list[list[int]]:
    """Consecutive non-overlapping windows of at most `length` tokens (those with a target: >= 2)."""
    out = [list(tokens[a:a + length]) for a in range(0, len(tokens), length)]
    return [w for w in out if len(w) >= 2]


def perplexity(model, params, documents: Iterable[Sequence[int]], *, seq_len: int, batch_size: int = 8,
               progress: bool = True, per_document: bool = False) -> dict:
    """exp(mean next-token NLL) of a causal LM over token-id documents.

    Each document is scored on its own (no context from other documents), cut into
    windows of `seq_len` tokens. Returns dict(perplexity, nll (nats/token), tokens
    (predicted tokens), windows); with `per_document`, also "per_document": one
    dict(nll_sum, nll_mean, tokens, windows) per document, in order (a document with
    fewer than two tokens predicts nothing: tokens 0, nll_mean None).
    Token ids outside the model's vocabulary are refused (EvalError), never scored.
    """
    cfg = model.cfg
    if cfg.family not in DECODER_FAMILIES:
        raise EvalError(f"perplexity needs a causal LM; {cfg.name!r} is a {cfg.family} model")
    owners, chunks, n_docs = [], [], 0
    for d, doc in enumerate(documents):
        n_docs += 1
        doc = np.asarray(doc, np.int64)
        if doc.size and (doc.min() < 0 or doc.max() >= cfg.vocab_size):
            bad = int(doc.max() if doc.max() >= cfg.vocab_size else doc.min())
            raise EvalError(f"document {d}: token id {bad} is outside the model's vocabulary [0, {cfg.vocab_size}) "
                            "(a tokenizer larger than the model's?)")
        for w in windows(doc.tolist(), seq_len):
            chunks.append(w)
            owners.append(d)
    if not chunks:
        raise EvalError("no document has two or more tokens: nothing to predict")
    length = max(len(w) for w in chunks)
    doc_nll, doc_count, doc_windows = np.zeros(n_docs), np.zeros(n_docs), np.zeros(n_docs, np.int64)
    bar = _bar(len(chunks), "perplexity", progress)
    for a, b in _batches(len(chunks), batch_size):
        ids, seg = pad_rows(chunks[a:b], length, rows=batch_size)  # fixed shape: one compile
        s, w = _nll_rows(model, params, jnp.asarray(ids), jnp.asarray(seg))
        s, w = np.asarray(s, np.float64)[: b - a], np.asarray(w, np.float64)[: b - a]
        np.add.at(doc_nll, owners[a:b], s)
        np.add.at(doc_count, owners[a:b], w)
        np.add.at(doc_windows, owners[a:b], 1)
        bar.update(b - a)
    bar.close()
    nll, count = float(doc_nll.sum()), float(doc_count.sum())
    mean = nll / count
    out = {"perplexity": float(np.exp(mean)), "nll": mean, "tokens": int(count), "windows": len(chunks)}
    if per_document:
        out["per_document"] = [{"nll_sum": float(s), "nll_mean": float(s / c) if c else None, "tokens": int(c),
                                "windows": int(k)} for s, c, k in zip(doc_nll, doc_count, doc_windows)]
    return out


# --------------------------------------------------------------------- classification


@partial(jax.jit, static_argnums=0)
def _class_logits(model, params, ids_BT, seg_BT):
    return model.apply({"params": params}, ids_BT, segment_ids=seg_BT)


def class_logits(model, params, rows: Sequence[Sequence[int]], *, seq_len: int, batch_size: int,
                 put=None, progress: bool = True) -> np.ndarray:
    """Class logits [N, C] of a sequence classifier for framed token rows.

    `put(host_array)` places a batch on devices (the trainer's batch sharding when
    called from fine-tuning); default: the default device.
    """
    put = put or jnp.asarray
    out = []
    bar = _bar(len(rows), "classify", progress)
    for a, b in _batches(len(rows), batch_size):
        ids, seg = pad_rows(rows[a:b], seq_len, rows=batch_size)
        seg[b - a:, 0] = 1  # filler rows get one token, so every row is a real input
        out.append(np.asarray(jax.device_get(_class_logits(model, params, put(ids), put(seg))))[: b - a])
        bar.update(b - a)
    bar.close()
    return np.concatenate(out).astype(np.float64)


def cross_entropy(logits_NC: np.ndarray, labels_N: np.ndarray) -> float:
    """Mean cross-entropy (nats) of class logits against integer labels."""
    z = logits_NC - logits_NC.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(labels_N)), labels_N].mean())


def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Fraction of predictions equal to the labels."""
    p, y = np.asarray(predictions), np.asarray(labels)
    if p.shape != y.shape or not p.size:
        raise EvalError(f"accuracy needs equally many predictions and labels (>0), got {p.size} and {y.size}")
    return float(np.mean(p == y))


def f1_score(predictions: Sequence[int], labels: Sequence[int], *, average: str = "macro",
             positive: int = 1) -> float:
    """F1 = 2PR/(P+R). average="macro": the mean over every class present in labels or
    predictions (a class with no true or predicted member would be undefined, so it is
    not counted); "binary": the F1 of class `positive`. A class with P+R = 0 scores 0.
    """
    p, y = np.asarray(predictions), np.asarray(labels)
    if p.shape != y.shape or not p.size:
        raise EvalError(f"f1 needs equally many predictions and labels (>0), got {p.size} and {y.size}")

    def f1(c):
        tp = np.sum((p == c) & (y == c))
        fp, fn = np.sum((p == c) & (y != c)), np.sum((p != c) & (y == c))
        return 0.0 if tp == 0 else 2.0 * tp / (2.0 * tp + fp + fn)

    if average == "binary":
        return float(f1(positive))
    if average != "macro":
        raise ValueError(f"average must be 'macro' or 'binary', got {average!r}")
    classes = np.union1d(p, y)
    return float(np.mean([f1(c) for c in classes]))


def classification_metrics(predictions: Sequence[int], labels: Sequence[int]) -> dict:
    """dict(accuracy, f1) with macro F1 (0-1)."""
    return {"accuracy": accuracy(predictions, labels), "f1": f1_score(predictions, labels)}


# ----------------------------------------------------------------------- text-to-text


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """sacrebleu corpus BLEU (0-100) of hypotheses against one reference each."""
    import sacrebleu

    if len(hypotheses) != len(references) or not hypotheses:
        raise EvalError(f"BLEU needs equally many hypotheses and references (>0), got {len(hypotheses)} "
                        f"and {len(references)}")
    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)


ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def rouge(hypotheses: Sequence[str], references: Sequence[str], types: Sequence[str] = ROUGE_TYPES) -> dict:
    """rouge-score F-measures (Porter stemmer), averaged over examples, scaled to 0-100."""
    from rouge_score import rouge_scorer

    if len(hypotheses) != len(references) or not hypotheses:
        raise EvalError(f"ROUGE needs equally many hypotheses and references (>0), got {len(hypotheses)} "
                        f"and {len(references)}")
    scorer = rouge_scorer.RougeScorer(list(types), use_stemmer=True)
    scores = [scorer.score(ref, hyp) for hyp, ref in zip(hypotheses, references)]
    return {t: 100.0 * float(np.mean([s[t].fmeasure for s in scores])) for t in types}


def text_metrics(hypotheses: Sequence[str], references: Sequence[str]) -> dict:
    """dict(bleu, rouge1, rouge2, rougeL), all 0-100."""
    return {"bleu": bleu(hypotheses, references), **rouge(hypotheses, references)}


def generate_texts(model, params, tokenizer, inputs: Sequence[Sequence[int]], *, seq_len: int, batch_size: int,
                   max_new_tokens: int, progress: bool = True) -> list[str]:
    """Greedy outputs of a T5 model for framed encoder inputs, decoded up to eos."""
    import zoo

    cfg = model.cfg
    texts = []
    bar = _bar(len(inputs), "generate", progress)
    for a, b in _batches(len(inputs), batch_size):
        rows = list(inputs[a:b]) + [[cfg.eos_token_id]] * (batch_size - (b - a))  # fixed batch: one compile
        ids, mask = pad_rows(rows, seq_len)
        new = np.asarray(zoo.generate(model, params, ids, mask, max_new_tokens=max_new_tokens))
        for row in new[: b - a]:
            row = list(row)
            if cfg.eos_token_id in row:
                row = row[: row.index(cfg.eos_token_id)]
            texts.append(decode_known(tokenizer, [t for t in row if t != cfg.pad_token_id]))
        bar.update(b - a)
    bar.close()
    return texts


# ------------------------------------------------------------------------------ data


# One JSONL reader for every command (BOM, file:line errors): it lives with the other data readers.
from zoo.data import read_jsonl  # noqa: E402


__all__ = ["EvalError", "Pretrained", "load_pretrained", "find_tokenizer", "load_tokenizer", "check_vocab", "decode_known", "restore_params", "latest_checkpoint",
           "config_to_json", "config_from_json", "write_run_metadata", "is_hf_dir", "is_run_dir", "token_id",
           "frame", "pad_rows", "windows", "perplexity", "class_logits", "cross_entropy", "accuracy", "f1_score",
           "classification_metrics", "bleu", "rouge", "text_metrics", "generate_texts", "read_jsonl"]
