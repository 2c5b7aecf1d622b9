"""What `zoo.to_hf` writes besides the weights, and where it agrees to write (issue 12).

* The output dir must be new or empty and is never swapped in over user files; it gets
  the umask's permissions (not mkdtemp's 0700).
* Special token ids survive HF -> zoo -> HF (config.json, generation_config.json and the
  tokenizer files, byte for byte), and a zoo run exports its own tokenizer's ids.

Tests that need transformers carry the `torch` mark (imported inside them).
"""

from __future__ import annotations

import json
import os
import stat

import jax
import jax.numpy as jnp
import pytest
from flax import linen as nn

import zoo
from zoo.data import Tokenizer as ZooTokenizer
from zoo.data import train_tokenizer
from zoo.hf import convert
from zoo.paths import OutputError
from zoo.pretrained import config_from_json, config_to_json

TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
WORDS = "the cat sat on a mat and dog ran under big red rug then we saw it go".split()


@pytest.fixture(scope="module")
def tiny():
    """(model, params) of tiny-gpt2."""
    model = zoo.build(zoo.config("tiny-gpt2"))
    params = jax.jit(lambda k: nn.unbox(model.init(k, jnp.ones((1, 4), jnp.int32))["params"]))(jax.random.key(0))
    return model, params


def _snapshot(root):
    """{relative path: bytes} of every file under `root`."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, root)] = fh.read()
    return out


# --- where to_hf writes ---------------------------------------------------------------------


def test_to_hf_refuses_a_non_empty_dir_and_touches_nothing(tiny, tmp_path, monkeypatch):
    model, params = tiny
    out = tmp_path / "mine"
    (out / "notes").mkdir(parents=True)
    (out / "config.json").write_text("my own config")
    (out / "notes" / "todo.txt").write_text("keep me")
    before = _snapshot(tmp_path)
    with pytest.raises(OutputError, match="not empty"):
        zoo.to_hf(model, params, out)
    assert _snapshot(tmp_path) == before
    assert sorted(os.listdir(tmp_path)) == ["mine"]  # no temporary dir left beside it

    monkeypatch.chdir(out)  # `to_hf(..., ".")` used to wipe the working directory
    with pytest.raises(OutputError):
        zoo.to_hf(model, params, ".")
    assert _snapshot(tmp_path) == before


def test_to_hf_refuses_a_file(tiny, tmp_path):
    model, params = tiny
    out = tmp_path / "model"
    out.write_bytes(b"not a dir")
    with pytest.raises(OutputError, match="is a file"):
        zoo.to_hf(model, params, out)
    assert out.read_bytes() == b"not a dir" and os.listdir(tmp_path) == ["model"]


def _check_export(out):
    """The files of a complete export; generation_config.json has config.json's ids."""
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    generation = json.loads((out / "generation_config.json").read_text())
    assert {k: v for k, v in config.items() if k in TOKEN_IDS and v is not None} == generation


def test_to_hf_into_an_empty_dir(tiny, tmp_path):
    model, params = tiny
    out = tmp_path / "empty"
    out.mkdir()
    zoo.to_hf(model, params, out)
    _check_export(out)
    assert os.listdir(tmp_path) == ["empty"]


def test_to_hf_into_a_missing_dir(tiny, tmp_path):
    model, params = tiny
    out = tmp_path / "a" / "b" / "export"
    zoo.to_hf(model, params, str(out))
    _check_export(out)
    assert os.listdir(out.parent) == ["export"]


def test_to_hf_permissions_follow_the_umask(tiny, tmp_path):
    model, params = tiny
    old = os.umask(0o022)
    try:
        zoo.to_hf(model, params, tmp_path / "export")
    finally:
        os.umask(old)
    out = tmp_path / "export"
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    for name in os.listdir(out):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o644, name


# --- token ids in the config translation -----------------------------------------------------


@pytest.mark.parametrize("preset,ids", [
    ("tiny-gpt2", dict(bos_token_id=0, eos_token_id=0, pad_token_id=None)),
    ("tiny-llama", dict(bos_token_id=3, eos_token_id=[4, 6], pad_token_id=5)),
    ("tiny-qwen3", dict(bos_token_id=None, eos_token_id=7, pad_token_id=7)),
    ("tiny-gemma", dict(bos_token_id=2, eos_token_id=1, pad_token_id=0)),
    ("tiny-mixtral", dict(bos_token_id=9, eos_token_id=8, pad_token_id=None)),
    ("tiny-bert", dict(bos_token_id=2, eos_token_id=3, pad_token_id=None)),
    ("tiny-t5", dict(bos_token_id=5, eos_token_id=3, pad_token_id=2)),  # HF's T5 has no bos, but keeps one
])
def test_config_keeps_token_ids(preset, ids):
    """config.json's ids -> zoo config -> config.json, and through zoo_config.json."""
    hf = {**convert.config_to_hf(zoo.config(preset)), **ids}
    cfg = convert.config_from_hf(json.loads(json.dumps(hf)))
    assert config_from_json(json.loads(json.dumps(config_to_json(cfg)))) == cfg
    back = json.loads(json.dumps(convert.config_to_hf(cfg)))
    assert {k: back.get(k) for k in TOKEN_IDS} == {k: hf.get(k) for k in TOKEN_IDS}


def test_config_without_token_ids_means_what_transformers_reads():
    """A config.json that leaves an id out gets transformers' class default, written explicitly."""
    hf = convert.config_to_hf(zoo.config("tiny-llama"))
    for key in TOKEN_IDS:
        hf.pop(key)
    cfg = convert.config_from_hf(hf)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (1, 2, None)


def test_zoo_config_json_without_token_ids_still_loads():
    for name in ("tiny-gpt2", "tiny-llama", "tiny-mixtral", "tiny-bert"):
        blob = config_to_json(zoo.config(name))
        for key in TOKEN_IDS:
            if not (name == "tiny-bert" and key == "pad_token_id"):
                del blob["fields"][key]
        assert config_from_json(blob) == zoo.config(name)


# --- HF -> zoo -> HF keeps the tokenizer and generation files ----------------------------------


def _hf_checkpoint(family, path, tokens, specials, **ids):
    """A tiny HF checkpoint saved with a word-level fast tokenizer and a generation config."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    from hf_utils import make_model, save

    model = make_model(family, **ids)
    model.generation_config = transformers.GenerationConfig(**ids, do_sample=True, temperature=0.7, top_k=5)
    save(model, path)
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token=tokens[-1]))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=tokens[-1], **specials) \
        .save_pretrained(path)
    return path


@pytest.mark.torch
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_hf_round_trip_keeps_special_tokens(family, tmp_path):
    import transformers

    if family == "gpt2":  # GPT-2 with <|endoftext|> first: bos = eos = 0 (was exported as 255)
        tokens = ["<|endoftext|>", *WORDS, "<unk>"]
        specials = dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>")
        ids = dict(bos_token_id=0, eos_token_id=0)
    else:  # Llama with its own ids (were dropped: transformers fell back to 1 / 2)
        tokens = ["a0", "a1", "a2", "<s>", "</s>", "<pad>", "<eot>", *WORDS, "<unk>"]
        specials = dict(bos_token="<s>", eos_token="</s>", pad_token="<pad>")
        ids = dict(bos_token_id=3, eos_token_id=4, pad_token_id=5)
    src = _hf_checkpoint(family, tmp_path / "hf", tokens, specials, **ids)
    shipped = convert.side_files(src)
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= set(shipped)

    model, params = zoo.from_hf(src)
    # `python -m zoo convert HF -> zoo` keeps the side files in the run dir; export reads them there.
    run = tmp_path / "run"
    run.mkdir()
    assert convert.copy_side_files(src, run) == shipped
    out = tmp_path / "back"
    zoo.to_hf(model, params, out, side_files_from=run)

    original, exported = (json.loads((d / "config.json").read_text()) for d in (src, out))
    assert {k: exported[k] for k in TOKEN_IDS} == {k: original.get(k) for k in TOKEN_IDS}
    for name in shipped:
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    a, b = (transformers.AutoTokenizer.from_pretrained(d) for d in (src, out))
    assert b.eos_token_id == a.eos_token_id == ids["eos_token_id"]
    assert b.bos_token_id == a.bos_token_id and b.pad_token_id == a.pad_token_id
    c, d = (transformers.AutoConfig.from_pretrained(p) for p in (src, out))
    assert [getattr(d, k) for k in TOKEN_IDS] == [getattr(c, k) for k in TOKEN_IDS]


# --- a zoo run exports its own tokenizer -------------------------------------------------------


@pytest.fixture(scope="module")
def sentencepiece(tmp_path_factory):
    """A tiny sentencepiece model as zoo pretraining trains one (pad 0, unk 1, bos 2, eos 3)."""
    import random

    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS + ["héllo", "日本", "x = 1\n", "  code()"]) for _ in range(150)) + "\n"
            for _ in range(40)]
    return train_tokenizer(docs, tmp_path_factory.mktemp("sp") / "tokenizer.model", 300)


@pytest.mark.torch
def test_sentencepiece_run_exports_its_eos(sentencepiece, tmp_path):
    import transformers

    tok = sentencepiece
    assert tok.eos_id == 3
    # A run whose config came from an HF config.json (`train.py --model config.json`): Llama's ids
    # 1 / 2 are not the ids the run trained with; its tokenizer's are.
    cfg = zoo.config("tiny-llama", bos_token_id=1, eos_token_id=2)
    model = zoo.build(cfg)
    params = jax.jit(lambda k: nn.unbox(model.init(k, jnp.ones((1, 4), jnp.int32))["params"]))(jax.random.key(0))
    out = tmp_path / "hf"
    zoo.to_hf(model, params, out, tokenizer=tok)

    config = json.loads((out / "config.json").read_text())
    generation = json.loads((out / "generation_config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (2, 3, 0)
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (2, 3, 0)
    assert (out / "tokenizer.model").read_bytes() == open(tok.path, "rb").read()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (2, 3, 0)
    sample = "the cat sat  on\nthe mat héllo 日本 x = 1 and  code() zzz!"
    assert hf_tok(sample)["input_ids"] == tok.encode(sample)
    assert hf_tok.decode(tok.encode(sample)) == tok.decode(tok.encode(sample))
    assert transformers.AutoConfig.from_pretrained(out).eos_token_id == 3


def test_tokenizer_keeps_the_pad_id_roberta_positions_use(sentencepiece, tmp_path):
    """RoBERTa numbers positions from pad_token_id + 1: a tokenizer whose pad differs from the
    config's gives bos/eos to config.json but not pad, so the export computes what the model did."""
    cfg = zoo.config("tiny-roberta", pad_token_id=5, max_seq_len=32)
    model = zoo.build(cfg)
    params = jax.jit(lambda k: nn.unbox(model.init(k, jnp.ones((1, 4), jnp.int32))["params"]))(jax.random.key(0))
    zoo.to_hf(model, params, tmp_path / "hf", tokenizer=sentencepiece)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (2, 3, 5)
    assert config["max_position_embeddings"] == 32 + 5 + 1
    again, again_params = zoo.from_hf(tmp_path / "hf")
    assert again.cfg.position_offset == 6 and again.cfg.max_seq_len == 32


@pytest.mark.torch
def test_tokenizer_json_run_exports_its_eos(tmp_path):
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokens = ["<pad>", "<unk>", *WORDS, "<|endoftext|>"]
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.save(str(tmp_path / "tok.json"))
    tok = ZooTokenizer(tmp_path / "tok.json")
    eos = len(tokens) - 1
    assert tok.eos_id == eos

    model = zoo.build(zoo.config("tiny-gpt2"))
    params = jax.jit(lambda k: nn.unbox(model.init(k, jnp.ones((1, 4), jnp.int32))["params"]))(jax.random.key(0))
    out = tmp_path / "hf"
    zoo.to_hf(model, params, out, tokenizer=tok, side_files_from=tmp_path / "no-side-files-here")
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (eos, eos, 0)
    assert (out / "tokenizer.json").read_bytes() == (tmp_path / "tok.json").read_bytes()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert (hf_tok.eos_token_id, hf_tok.pad_token_id) == (eos, 0)
    assert hf_tok("the cat sat", add_special_tokens=False)["input_ids"] == tok.encode("the cat sat")
