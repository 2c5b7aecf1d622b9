"""The rule engine every family's Hugging Face weight table is written in.

Each supported HF class (config.json's `architectures[0]`) has one `ArchSpec`: a
config translation pair (HF dict <-> zoo config) and a weight table of `Rule`s.
A rule maps one HF tensor name pattern to one or more zoo parameter paths with an
exact, invertible layout change (transpose and/or reshape, or a split of a fused
tensor), so import followed by export is bit-identical. Stacked axes (the scanned
layer axis `{i}`, the expert axis `{e}` of MoE models) are placeholders in the HF
pattern that index the leading axes of the zoo parameter.

The tables live beside each model (zoo/models/<family>/hf.py); zoo/hf/convert.py runs them.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable

import numpy as np

from zoo.configs import ModelConfig


class CheckpointError(ValueError):
    """A checkpoint that cannot be converted; the message names the file and the tensor."""


# --- layouts: exact, invertible HF <-> zoo transforms ------------------------------------
# "copy":   same values, reshaped (norm scales, embeddings, biases, GPT-2's Conv1D [in, out]).
# "linear": torch nn.Linear weight [out, in] -> zoo kernel [in..., out...] (transpose + reshape).
# "fused":  the HF tensor's last axis holds len(zoo) equal parts (GPT-2 c_attn = q|k|v).
# "fused_linear": a torch nn.Linear weight whose output rows are the zoo kernels' outputs one
#           after another, sized by each kernel (Phi-3 qkv_proj = q|k|v with GQA, gate_up_proj).
# "interleaved": the HF tensor's last axis alternates the zoo parts (GPT-OSS gate_up_proj: even
#           columns gate, odd columns up).
# "linear_rope_pairs": "linear" for a q/k projection whose rows inside each head are RoPE pairs
#           (x[2i], x[2i+1]) (Llama 4's complex RoPE): the zoo kernel holds each head's even rows, then
#           its odd rows, the half-split order zoo.nn.rope rotates, so the logits are unchanged.
# "linear_split": a torch nn.Linear weight [G * sum(d_j), in] whose G groups (heads; 1 for an
#           ungrouped projection) each hold the zoo parts' rows one after another; zoo kernel j is
#           [in, (G,) d_j] (DeepSeek's q_b_proj = per head [q_nope | q_rope], kv_b_proj = [k_nope | v]).
# "linear_split_rope_pairs": "linear_split" whose last part is RoPE pairs (x[2i], x[2i+1]),
#           reordered even-then-odd as in "linear_rope_pairs" (DeepSeek's q_rope and k_rope rows).
LAYOUTS = ("copy", "linear", "fused", "fused_linear", "interleaved", "linear_rope_pairs", "linear_split",
           "linear_split_rope_pairs")


def _rope_pair_order(head_dim: int) -> np.ndarray:
    """Zoo row j of a head holds HF row order[j]: the even rows, then the odd rows."""
    return np.concatenate([np.arange(0, head_dim, 2), np.arange(1, head_dim, 2)])


@dataclass(frozen=True)
class Rule:
    """One HF tensor pattern <-> zoo parameter path(s).

    hf: name pattern; `{i}` (and any other placeholder named in `stack`) expands over
        the stacked leading axes of the zoo parameters.
    zoo: "/"-joined paths into the params tree (several for "fused").
    layout: one of LAYOUTS.
    hf_shape: the HF tensor's shape (one stacked index).
    stack: (placeholder, size[, first HF index[, stride]]) entries, in the order of the zoo
        parameter's leading axes: HF index = first + stride * zoo index (ModernBERT's scanned
        layers start at HF layer 1; Llama 4's scanned blocks of two layers take every other one).
    """

    hf: str
    zoo: tuple[str, ...]
    layout: str
    hf_shape: tuple[int, ...]
    stack: tuple[tuple[str, int], ...] = ()

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"rule {self.hf}: unknown layout {self.layout!r} (one of {LAYOUTS})")

    def expand(self):
        """Yields (hf_key, stacked index) for every tensor this rule covers."""
        names = [entry[0] for entry in self.stack]
        starts = [entry[2] if len(entry) > 2 else 0 for entry in self.stack]
        strides = [entry[3] if len(entry) > 3 else 1 for entry in self.stack]
        for idx in itertools.product(*(range(entry[1]) for entry in self.stack)):
            yield self.hf.format(**{n: s + i * d for n, i, s, d in zip(names, idx, starts, strides)}), idx

    def to_zoo(self, x: np.ndarray, zoo_shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
        """HF tensor -> zoo pieces (one stacked index each), following the layout."""
        if self.layout == "copy":
            return [x.reshape(zoo_shapes[0])]
        if self.layout == "linear":
            return [x.T.reshape(zoo_shapes[0])]
        if self.layout == "linear_rope_pairs":
            heads, h = zoo_shapes[0][-2:]
            rows = x.reshape(heads, h, -1)[:, _rope_pair_order(h), :]
            return [rows.reshape(heads * h, -1).T.reshape(zoo_shapes[0])]
        if self.layout in ("linear_split", "linear_split_rope_pairs"):
            dims = [s[-1] for s in zoo_shapes]
            n_in = x.shape[1]
            parts = np.split(x.reshape(-1, sum(dims), n_in), np.cumsum(dims)[:-1], axis=1)  # each [G, d_j, in]
            if self.layout == "linear_split_rope_pairs":
                parts[-1] = parts[-1][:, _rope_pair_order(dims[-1]), :]
            return [p.transpose(2, 0, 1).reshape(s) for p, s in zip(parts, zoo_shapes)]
        if self.layout == "fused_linear":
            n_in = x.shape[1]
            bounds = np.cumsum([int(np.prod(s)) // n_in for s in zoo_shapes])[:-1]
            return [p.reshape(s) for p, s in zip(np.split(x.T, bounds, axis=1), zoo_shapes)]
        if self.layout == "interleaved":
            n = len(self.zoo)
            return [np.ascontiguousarray(x[..., j::n]).reshape(s) for j, s in enumerate(zoo_shapes)]
        parts = np.split(x, len(self.zoo), axis=-1)
        return [p.reshape(s) for p, s in zip(parts, zoo_shapes)]

    def to_hf(self, pieces: list[np.ndarray]) -> np.ndarray:
        """Zoo pieces (one stacked index each) -> the HF tensor: the exact inverse of `to_zoo`."""
        if self.layout == "copy":
            return pieces[0].reshape(self.hf_shape)
        if self.layout == "linear":
            return pieces[0].reshape(self.hf_shape[::-1]).T
        if self.layout == "linear_rope_pairs":
            heads, h = pieces[0].shape[-2:]
            rows = pieces[0].reshape(-1, heads * h).T.reshape(heads, h, -1)
            return rows[:, np.argsort(_rope_pair_order(h)), :].reshape(self.hf_shape)
        if self.layout in ("linear_split", "linear_split_rope_pairs"):
            n_in = self.hf_shape[1]
            dims = [p.shape[-1] for p in pieces]
            groups = self.hf_shape[0] // sum(dims)
            parts = [p.reshape(n_in, groups, d).transpose(1, 2, 0) for p, d in zip(pieces, dims)]
            if self.layout == "linear_split_rope_pairs":
                parts[-1] = parts[-1][:, np.argsort(_rope_pair_order(dims[-1])), :]
            return np.concatenate(parts, axis=1).reshape(self.hf_shape)
        if self.layout == "fused_linear":
            n_in = self.hf_shape[1]
            return np.concatenate([p.reshape(n_in, -1) for p in pieces], axis=1).T
        if self.layout == "interleaved":
            part_shape = self.hf_shape[:-1] + (self.hf_shape[-1] // len(pieces),)
            return np.stack([p.reshape(part_shape) for p in pieces], axis=-1).reshape(self.hf_shape)
        part_shape = self.hf_shape[:-1] + (self.hf_shape[-1] // len(pieces),)
        return np.concatenate([p.reshape(part_shape) for p in pieces], axis=-1)


def layer_norm(hf: str, zoo: str, dim: int, stack: tuple = ()) -> list[Rule]:
    """A LayerNorm: HF `<hf>.weight` / `<hf>.bias` <-> zoo `<zoo>/scale` / `<zoo>/bias`, [dim] each."""
    return [Rule(hf + ".weight", (zoo + "/scale",), "copy", (dim,), stack),
            Rule(hf + ".bias", (zoo + "/bias",), "copy", (dim,), stack)]


def dense(hf: str, zoo: str, layout: str, hf_shape: tuple[int, int], stack: tuple = ()) -> list[Rule]:
    """A biased dense layer: HF `<hf>.weight` (in `layout`: "linear" is torch's [out, in], "copy" a
    Conv1D's [in, out]) <-> zoo `<zoo>/kernel`, and its bias [out] <-> `<zoo>/bias`."""
    out = hf_shape[0] if layout == "linear" else hf_shape[-1]
    return [Rule(hf + ".weight", (zoo + "/kernel",), layout, hf_shape, stack),
            Rule(hf + ".bias", (zoo + "/bias",), "copy", (out,), stack)]


@dataclass(frozen=True)
class ArchSpec:
    """Everything needed to convert one HF architecture.

    config_from_hf(hf_dict, name) -> zoo config; config_to_hf(cfg) -> HF dict;
    weights(cfg) -> list of Rules; ignore: regexes of HF keys that are buffers, not
    weights; tied(cfg) -> {alias key: source key} for tensors that may be present in a
    checkpoint but must equal their source (tied LM heads); normalize_key maps legacy
    key spellings to the table's; mxfp4: the loader dequantises MXFP4 block/scale pairs;
    fit_to_tensors(cfg, keys) -> cfg: what only the checkpoint's tensor names tell (DeepSeek-V3's
    multi-token-prediction layers, which config.json claims whether or not they were saved);
    copies(cfg) -> {key: source key}: tensors a checkpoint holds twice, checked equal on import
    and written again on export.
    """

    config_from_hf: Callable[[dict, str], ModelConfig]
    config_to_hf: Callable[[ModelConfig], dict]
    weights: Callable[[ModelConfig], list[Rule]]
    ignore: tuple[str, ...] = ()
    tied: Callable[[ModelConfig], dict[str, str]] = lambda cfg: {}
    normalize_key: Callable[[str], str] = lambda key: key
    mxfp4: bool = False  # a tensor may come as MXFP4 `<key>_blocks` + `<key>_scales` (zoo/hf/mxfp4.py)
    fit_to_tensors: Callable[[ModelConfig, frozenset], ModelConfig] = lambda cfg, keys: cfg
    copies: Callable[[ModelConfig], dict[str, str]] = lambda cfg: {}


# --- helpers the families' config translations share ------------------------------------

def require(cond: bool, message: str) -> None:
    """Raises CheckpointError(message) unless cond."""
    if not cond:
        raise CheckpointError(message)


def get(hf: dict, key: str, default=None):
    """hf[key], or `default` when it is absent or null (HF writes null for "use the default")."""
    value = hf.get(key)
    return default if value is None else value


TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def token_ids_from_hf(hf: dict, defaults: tuple = (None, None, None)) -> dict:
    """bos/eos/pad ids of an HF config dict (a list of eos ids becomes a tuple).

    defaults: what transformers' config class falls back to when config.json leaves an
    id out. Import fills these in, so the export means to transformers what the source
    meant, and writes every id explicitly.
    """
    out = {}
    for key, default in zip(TOKEN_ID_FIELDS, defaults):
        value = hf[key] if key in hf else default
        out[key] = tuple(value) if isinstance(value, list) else value
    return out


def token_ids_to_hf(cfg: ModelConfig) -> dict:
    """bos/eos/pad ids of a config as config.json writes them (several eos ids as a list)."""
    return {key: list(v) if isinstance(v := getattr(cfg, key), tuple) else v for key in TOKEN_ID_FIELDS}


# --- multimodal classes imported for their text tower (Gemma 3, Llama 4) -------------------

# The tower's key spellings: the hub's (language_model.model.*, language_model.lm_head) and
# transformers 5's module paths (model.language_model.*)
_TEXT_TOWER = ("language_model.model.", "model.language_model.")


def text_tower_key(key: str) -> str:
    """language_model.model.X / model.language_model.X -> model.X; language_model.lm_head -> lm_head."""
    for prefix in _TEXT_TOWER:
        if key.startswith(prefix):
            return "model." + key[len(prefix):]
    return key[len("language_model."):] if key.startswith("language_model.lm_head.") else key


def text_tower_config(hf: dict, arch: str) -> dict:
    """The text model's config dict of a multimodal config.json (its `text_config`, with the token
    ids and head tying the outer config carries in some releases)."""
    text = dict(hf.get("text_config") or {})
    require(bool(text), f"{arch}: config.json has no text_config")
    for key in (*TOKEN_ID_FIELDS, "tie_word_embeddings"):
        if key not in text and key in hf:
            text[key] = hf[key]
    return text
