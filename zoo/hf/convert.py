"""Hugging Face <-> zoo conversion: the family-agnostic engine.

config.json's `architectures[0]` names the HF class; `zoo.registry.by_architecture`
finds the family, whose record holds that class's `ArchSpec` (zoo/models/<family>/hf.py):
the config translation and the weight table of `Rule`s (zoo/hf/rules.py).

Import streams tensor by tensor from the safetensors files into one preallocated
numpy buffer per zoo parameter, so host memory stays near the checkpoint size.
Export writes into a new (absent or empty) directory only: it is built in a temporary
sibling and renamed into place once complete (`zoo.paths`); nothing already on disk is
replaced or deleted. Beside the weights travel the special token ids (config.json and
generation_config.json) and the tokenizer files (`HF_SIDE_FILES`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from zoo import registry
from zoo.configs import ModelConfig
from zoo.hf import mxfp4
from zoo.hf.rules import TOKEN_ID_FIELDS, ArchSpec, CheckpointError, Rule
from zoo.hf.safetensors import SafetensorsFile, checkpoint_files, write_safetensors
from zoo.paths import check_new_dir, staged_dir


def _spec(arch: str, where: str) -> ArchSpec:
    """The table of HF class `arch` (CheckpointError naming `where` and the supported classes if none)."""
    try:
        return registry.by_architecture(arch).spec(arch)
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None


# --- config translation ------------------------------------------------------------------

def config_from_hf(hf_config: dict, name: str = "hf", dtype=None, where: str = "config") -> ModelConfig:
    """A zoo config from an HF config.json dict.

    dtype: compute and param dtype; None keeps the zoo defaults (bf16 compute, float32
    params), which is what training from scratch wants. Raises CheckpointError for an
    unsupported architecture or config feature, or a missing required field.
    """
    archs = hf_config.get("architectures") or []
    if not archs:
        raise CheckpointError(f"{where}: no `architectures` entry; supported: {', '.join(registry.architectures())}")
    spec = _spec(archs[0], where)
    try:
        cfg = spec.config_from_hf(hf_config, name)
    except KeyError as e:
        raise CheckpointError(f"{where}: {archs[0]} config is missing the field {e}") from None
    except CheckpointError as e:
        raise CheckpointError(f"{where}: {e}") from None
    if dtype is None:
        return cfg
    name = jnp.dtype(dtype).name
    return cfg.replace(dtype=name, param_dtype=name)


def config_to_hf(cfg: ModelConfig) -> dict:
    """The HF config.json dict (architectures, model_type and every field transformers needs)."""
    out = _spec(cfg.hf_architecture, cfg.name).config_to_hf(cfg)
    out["dtype"] = cfg.param_dtype
    out["torch_dtype"] = cfg.param_dtype  # transformers<5 reads this spelling
    return out


# --- import ------------------------------------------------------------------------------

def _abstract_params(model: nn.Module) -> dict[str, jax.ShapeDtypeStruct]:
    """Zoo param path -> shape and dtype, from `jax.eval_shape` of the model's init (nothing
    allocated). A leaf the model keeps in float32 whatever its param_dtype (DeepSeek-V3's router
    correction bias, whose updates are below bfloat16's resolution) has float32 here."""
    ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    tree = nn.unbox(jax.eval_shape(lambda i: model.init(jax.random.key(0), i), ids)["params"])
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(p.key for p in path): x for path, x in flat}


def _nest(flat: dict[str, Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def from_hf(path, dtype=jnp.float32):
    """Loads an HF checkpoint dir (config.json + model.safetensors or a sharded index).

    Returns (model, params) with plain (unboxed) arrays of `dtype` (leaves the model keeps in
    float32 whatever its param dtype stay float32). Raises
    FileNotFoundError without config.json and CheckpointError (naming file and tensor)
    for an unsupported architecture, missing, unexpected or mis-shaped tensors, or an
    unreadable safetensors file.
    """
    root = Path(path)
    if root.name == "config.json":
        root = root.parent
    config_path = root / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path} not found: an HF checkpoint dir needs config.json")
    try:
        hf_config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_path}: not valid JSON: {e}") from e
    cfg = config_from_hf(hf_config, name=root.resolve().name, dtype=dtype, where=str(config_path))
    spec = _spec(hf_config["architectures"][0], str(config_path))
    files = [SafetensorsFile(f) for f in checkpoint_files(root)]
    owner = {raw_key: file for file in files for raw_key in file.keys}
    by_key = {spec.normalize_key(raw_key): (file, raw_key) for raw_key, file in owner.items()}
    cfg = spec.fit_to_tensors(cfg, frozenset(by_key))
    model = registry.of(cfg).build(cfg)
    abstract = _abstract_params(model)
    zoo_shapes = {p: tuple(x.shape) for p, x in abstract.items()}
    np_dtype = np.dtype(jnp.dtype(dtype))

    rules = spec.weights(cfg)
    expected = {key: (rule, idx) for rule in rules for key, idx in rule.expand()}
    tied = {**{k: (v, "tied embeddings") for k, v in spec.tied(cfg).items()},
            **{k: (v, "the checkpoint holds it twice") for k, v in spec.copies(cfg).items()}}
    ignore = [re.compile(p) for p in spec.ignore]
    buffers = {p: np.empty(zoo_shapes[p], np.dtype(abstract[p].dtype) if abstract[p].dtype == jnp.float32 else np_dtype)
               for rule in rules for p in rule.zoo}
    loaded: set[str] = set()
    aliases: list[tuple[SafetensorsFile, str, tuple[str, str]]] = []

    for file in files:
        for raw_key in file.keys:
            key = spec.normalize_key(raw_key)
            if any(p.search(key) for p in ignore):
                continue
            if key in tied:
                aliases.append((file, raw_key, tied[key]))
                continue
            read = None
            if spec.mxfp4 and key.endswith(("_blocks", "_scales")) and key not in expected:
                name, read = _mxfp4_tensor(raw_key, owner)
                if read is None:  # the scales: read with their blocks
                    continue
                key = spec.normalize_key(name)
            if key not in expected:
                raise CheckpointError(f"{file.path}: unexpected tensor {raw_key!r} for {cfg.hf_architecture}")
            if key in loaded:
                raise CheckpointError(f"{file.path}: tensor {raw_key!r} appears twice in the checkpoint")
            rule, idx = expected[key]
            # (an MXFP4 pair's shape comes from its blocks' header: nothing is dequantised before the check)
            shape = mxfp4.dequantized_shape(file.shape(raw_key)) if read is not None else file.shape(raw_key)
            if shape != rule.hf_shape:
                raise CheckpointError(f"{file.path}: tensor {raw_key!r} has shape {shape}, "
                                      f"expected {rule.hf_shape}")
            value = read() if read is not None else file.read(raw_key)
            pieces = rule.to_zoo(value, [zoo_shapes[p][len(idx):] for p in rule.zoo])
            for p, piece in zip(rule.zoo, pieces):
                buffers[p][idx] = piece  # casts to `dtype` in place
            # Release this tensor before the next read, or two (the largest, often the
            # adjacent embedding and lm_head) sit beside the buffers at once.
            del pieces, piece, value, read
            loaded.add(key)

    missing = [k for k in expected if k not in loaded]
    if missing:
        where = ", ".join(str(f.path) for f in files)
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{where}: missing tensor {missing[0]!r}{more}")
    for file, raw_key, (source, why) in aliases:  # the source itself was loaded (else it is missing above)
        src_file, src_raw = by_key[source]
        if file.shape(raw_key) != src_file.shape(src_raw) or not np.array_equal(file.read(raw_key),
                                                                               src_file.read(src_raw)):
            raise CheckpointError(f"{file.path}: tensor {raw_key!r} must equal {source!r} ({why}) but differs")

    params = {p: jnp.asarray(buffers.pop(p)) for p in list(buffers)}
    return model, _nest(params)


def _mxfp4_tensor(raw_key: str, owner: dict):
    """For an MXFP4 `<name>_blocks` / `<name>_scales` key: (name, read) where read() gives the
    dequantised float32 tensor, or (name, None) for the scales (read with their blocks). A blocks
    key without its scales (or the reverse) is a CheckpointError."""
    blocks_key = raw_key[: -len("_scales")] + "_blocks" if raw_key.endswith("_scales") else raw_key
    name = blocks_key[: -len("_blocks")]
    scales_key = name + "_scales"
    for needed in (blocks_key, scales_key):
        if needed not in owner:
            raise CheckpointError(f"{owner[raw_key].path}: MXFP4 tensor {raw_key!r} has no {needed!r} beside it")
    if raw_key == scales_key:
        return name, None
    def read():
        try:
            return mxfp4.dequantize(owner[blocks_key].read(blocks_key), owner[scales_key].read(scales_key))
        except ValueError as e:
            raise CheckpointError(f"{owner[raw_key].path}: {raw_key!r}: {e}") from None

    return name, read


# --- export ------------------------------------------------------------------------------

def _hf_tensor(rule: Rule, arrays: list[np.ndarray], idx: tuple[int, ...]) -> np.ndarray:
    """One HF tensor from the zoo arrays of a rule, at one stacked index."""
    return rule.to_hf([a[idx] for a in arrays])


# The Hugging Face files that travel beside the weights: tokenizers (every format
# transformers reads), their settings, the generation defaults and chat templates.
HF_SIDE_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
    "tokenizer.tiktoken", "generation_config.json", "chat_template.jinja", "chat_template.json",
)


def side_files(src_dir) -> list[str]:
    """Names of the `HF_SIDE_FILES` present in `src_dir` (in that order)."""
    root = Path(src_dir)
    return [name for name in HF_SIDE_FILES if (root / name).is_file()]


def copy_side_files(src_dir, dst_dir) -> list[str]:
    """Copies the `HF_SIDE_FILES` present in `src_dir` into `dst_dir`, byte for byte (the
    contents, not links or permissions); returns the names copied."""
    src, dst = Path(src_dir), Path(dst_dir)
    names = side_files(src)
    for name in names:
        if not ((dst / name).exists() and os.path.samefile(src / name, dst / name)):
            shutil.copyfile(src / name, dst / name)
    return names


_BOS_PIECES = ("<s>", "<|begin_of_text|>", "<bos>", "<|endoftext|>")
_PAD_PIECES = ("<pad>", "[PAD]", "<|pad|>")
_UNK_PIECES = ("<unk>", "[UNK]")
_BERT_PIECES = {"cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]"}


def _tokenizer_specials(tokenizer) -> tuple[dict[str, int], dict[str, str]]:
    """The special tokens of a `zoo.data.Tokenizer`: ({bos/eos/pad: id}, {HF *_token name: text}).

    eos is the tokenizer's `eos_id` (what zoo training appends to every document). A
    sentencepiece model declares bos, pad and unk; a tokenizer.json's are looked up by the
    usual spellings. An id the tokenizer does not have is left out."""
    if tokenizer.path.endswith(".json"):
        from tokenizers import Tokenizer as HFTokenizer

        hf = HFTokenizer.from_file(tokenizer.path)
        vocab = hf.get_vocab(with_added_tokens=True)
        text = hf.id_to_token

        def find(pieces):
            return next((vocab[p] for p in pieces if p in vocab), None)

        found = {"bos": find(_BOS_PIECES), "pad": find(_PAD_PIECES), "unk": find(_UNK_PIECES),
                 **{k: vocab.get(v) for k, v in _BERT_PIECES.items()}}
    else:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=tokenizer.path)
        text = sp.id_to_piece
        found = {"bos": sp.bos_id(), "pad": sp.pad_id(), "unk": sp.unk_id()}
    found["eos"] = tokenizer.eos_id
    for key in ("bos", "pad"):  # a Tokenizer that knows its own ids says so
        if getattr(tokenizer, f"{key}_id", None) is not None:
            found[key] = getattr(tokenizer, f"{key}_id")
    found = {k: int(v) for k, v in found.items() if v is not None and v >= 0}
    ids = {f"{k}_token_id": found[k] for k in ("bos", "eos", "pad") if k in found}
    names = {(k if k.endswith("_token") else f"{k}_token"): text(v) for k, v in found.items()}
    return ids, names


def _write_tokenizer(tokenizer, names: dict[str, str], cfg: ModelConfig, out: Path) -> None:
    """The tokenizer file under the name transformers looks for, and the settings that make
    `AutoTokenizer.from_pretrained(out)` load it with these special tokens and encode as
    zoo's Tokenizer does (no bos/eos added). transformers' generic fast tokenizer reads a
    tokenizer.json, and converts a sentencepiece tokenizer.model keeping its normaliser
    (LlamaTokenizer would add a dummy-prefix space the zoo's models never use)."""
    name = "tokenizer.json" if tokenizer.path.endswith(".json") else "tokenizer.model"
    shutil.copyfile(tokenizer.path, out / name)
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", **names, "add_bos_token": False,
                "add_eos_token": False, "clean_up_tokenization_spaces": False, "model_max_length": cfg.max_seq_len}
    (out / "tokenizer_config.json").write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(names, indent=2, ensure_ascii=False) + "\n")


def _generation_config(hf_config: dict, base: dict | None = None) -> dict:
    """generation_config.json: `base`'s settings with the special ids of config.json."""
    out = dict(base or {})
    for key in (*TOKEN_ID_FIELDS, "decoder_start_token_id"):
        if hf_config.get(key) is not None:
            out[key] = hf_config[key]
        else:
            out.pop(key, None)
    return out


def to_hf(model: nn.Module, params, out_dir, *, tokenizer=None, side_files_from=None) -> None:
    """Writes `out_dir`: config.json + model.safetensors that transformers loads, the
    tokenizer files and generation_config.json.

    out_dir must not exist yet or be an empty directory (`zoo.paths.check_new_dir`; checked
    before any work, an OutputError otherwise). It is built in a temporary sibling that
    becomes `out_dir` only once complete, with the umask's permissions; on failure the
    temporary dir is removed and nothing at `out_dir` changes.

    side_files_from: a dir (an HF checkpoint, or a zoo run dir that `python -m zoo convert`
        made from one) whose `HF_SIDE_FILES` are copied verbatim. When they include a
        tokenizer_config.json they are the tokenizer, and config.json keeps the config's ids.
    tokenizer: a `zoo.data.Tokenizer` (the run's own); used when `side_files_from` brings no
        tokenizer_config.json. Its file is written as tokenizer.json or tokenizer.model with
        a tokenizer_config.json and special_tokens_map.json, and its bos/eos/pad ids
        replace the config's in config.json (a zoo run's eos is what its tokenizer appends).
    generation_config.json carries config.json's ids (a copied one keeps its other settings).
    """
    sources = [s for s in (side_files_from, getattr(tokenizer, "path", None)) if s is not None]
    out = check_new_dir(out_dir, flag="out_dir", sources=sources)
    cfg = model.cfg
    spec = _spec(cfg.hf_architecture, cfg.name)
    hf_config = config_to_hf(cfg)
    copied = side_files(side_files_from) if side_files_from is not None else []
    use_tokenizer = tokenizer is not None and "tokenizer_config.json" not in copied
    names: dict[str, str] = {}
    if use_tokenizer:
        ids, names = _tokenizer_specials(tokenizer)
        # Except ids the model's forward depends on (RoBERTa's positions start after pad):
        # those stay the config's, so the export computes what the model computed.
        hf_config.update({k: v for k, v in ids.items() if k not in getattr(cfg, "model_token_ids", ())})
        # The tokenizer's files replace the source's; its ids replace those of a copied generation config.
        copied = [n for n in copied if n in ("generation_config.json", "chat_template.jinja", "chat_template.json")]
    flat = {"/".join(p.key for p in path): x
            for path, x in jax.tree_util.tree_flatten_with_path(nn.unbox(params))[0]}
    rules = spec.weights(cfg)
    needed = {p for rule in rules for p in rule.zoo}
    if set(flat) != needed:
        raise CheckpointError(f"{cfg.name}: params do not match the {cfg.hf_architecture} weight table; "
                              f"missing {sorted(needed - set(flat))}, extra {sorted(set(flat) - needed)}")
    host = {p: np.asarray(jax.device_get(x)) for p, x in flat.items()}
    tensors = []
    for rule in rules:
        arrays = [host[p] for p in rule.zoo]
        dtype = arrays[0].dtype
        for key, idx in rule.expand():
            tensors.append((key, rule.hf_shape, dtype, lambda r=rule, a=arrays, i=idx: _hf_tensor(r, a, i)))
    by_name = {t[0]: t for t in tensors}
    tensors += [(alias,) + by_name[source][1:] for alias, source in spec.copies(cfg).items()]
    tensors.sort(key=lambda t: t[0])

    with staged_dir(out) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
        write_safetensors(tmp / "model.safetensors", tensors)
        for name in copied:
            shutil.copyfile(Path(side_files_from) / name, tmp / name)
        if use_tokenizer:
            _write_tokenizer(tokenizer, names, cfg, tmp)
        gen = tmp / "generation_config.json"
        if use_tokenizer or not gen.exists():
            base = json.loads(gen.read_text()) if gen.exists() else None
            gen.write_text(json.dumps(_generation_config(hf_config, base), indent=2, sort_keys=True) + "\n")


