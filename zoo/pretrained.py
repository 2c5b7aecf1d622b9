"""Model dirs: the run-directory format, and loading a model dir into (model, params, tokenizer).

A *model dir* is either a Hugging Face checkpoint (config.json + safetensors, with a
tokenizer.json or a sentencepiece .model beside it) or a zoo run directory: what
`train.py --out DIR` writes (args.json, tokenizer.model, checkpoints/<step>/state)
or what `python -m zoo convert` and fine-tuning write (zoo_config.json instead of
args.json). `load_pretrained` reads either into a `Pretrained`.

`EvalError` is the one user error of "this cannot be loaded or evaluated": loading
here, evaluation (zoo.eval) and the CLI raise it, and the CLI reports it as one line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import linen as nn

import zoo
from zoo import registry
from zoo.checkpoint import quiet_absl
from zoo.configs import parse_overrides, with_overrides
from zoo.data.tokenizer import Tokenizer
from zoo.hf.convert import config_from_hf
from zoo.paths import resolve

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model")
ZOO_CONFIG = "zoo_config.json"


class EvalError(ValueError):
    """Bad input to an evaluation or a model dir that cannot be used: reported as one line."""


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
    cls = registry.config_class(blob.get("class", ""))
    if cls is None or not dataclasses.is_dataclass(cls):
        raise EvalError(f"unknown zoo config class {blob.get('class')!r}")
    return cls(**{k: _tuples(v) for k, v in blob["fields"].items()})


def write_run_metadata(out, cfg, tokenizer=None) -> None:
    """Writes `<out>/zoo_config.json` and copies the tokenizer file beside it (keeping its name)."""
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
    name = args["model"]
    if name.endswith(".json") or os.path.isdir(name):
        path = os.path.join(name, "config.json") if os.path.isdir(name) else name
        if not os.path.isfile(path):
            raise EvalError(f"{run}/args.json: the run's --model {name} is gone; cannot rebuild its config")
        with open(path) as f:
            cfg = config_from_hf(json.load(f))
    else:
        cfg = zoo.config(name)
    try:  # the run's --override items, then the dtype/remat flags, as train.py applied them
        overrides = parse_overrides(args.get("override"))
    except ValueError as e:
        raise EvalError(f"{run}/args.json: {e}") from None
    overrides.update({k: args[k] for k in ("dtype", "param_dtype", "remat") if args.get(k)})
    vocab = args.get("vocab_size")
    if vocab == "tokenizer":
        if tokenizer is None:
            raise EvalError(f"{run}: trained with --vocab-size tokenizer but its tokenizer is missing")
        overrides["vocab_size"] = -(-tokenizer.vocab_size // 128) * 128
    elif vocab:
        overrides["vocab_size"] = int(vocab)
    try:
        return with_overrides(cfg, overrides)
    except ValueError as e:
        raise EvalError(f"{run}/args.json: {e}") from None


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
    state_dir = resolve(state_dir)  # orbax reads no metadata tree from a relative path
    ckpt = ocp.PyTreeCheckpointer()
    with quiet_absl():  # orbax warns that the *step* metadata is not in this item dir
        meta = ckpt.metadata(state_dir)
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
    root = resolve(path)  # absolute once, here: orbax misreads relative checkpoint paths; messages keep `path`
    if not root.is_dir():
        raise EvalError(f"model dir does not exist: {path}")
    tok = None
    if tokenizer:
        if not os.path.isfile(resolve(tokenizer)):
            raise EvalError(f"tokenizer file does not exist: {tokenizer}")
        tok = load_tokenizer(resolve(tokenizer), name=tokenizer)
    if is_hf_dir(root):
        model, params = zoo.from_hf(root, dtype=jnp.dtype(dtype or "float32"))
        return Pretrained(model, params, tok or find_tokenizer(root), str(root), "hf")
    if not is_run_dir(root):
        raise EvalError(f"{path} is neither an HF checkpoint dir (config.json + safetensors) nor a zoo run dir "
                        "(checkpoints/ with args.json or zoo_config.json)")
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
    # param_dtype, except leaves the model keeps in float32 whatever it (DeepSeek's router correction bias)
    kept = {path for path, x in jax.tree_util.tree_flatten_with_path(nn.unbox(zoo.abstract_params(cfg)))[0]
            if x.dtype == jnp.float32}
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.asarray(x, jnp.float32 if path in kept else jnp.dtype(cfg.param_dtype)), params)
    return Pretrained(zoo.build(cfg), params, tok, str(root), "run")
