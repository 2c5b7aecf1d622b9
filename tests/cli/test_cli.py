"""`python -m zoo` (generate, convert, eval) in small mode, checked against independent computations
(zoo.generate called directly, PyTorch for perplexity, transformers loading what convert writes).

Tests that need torch + transformers carry the `torch` mark (imported inside them).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from zoo.data import pad_rows
from zoo.pretrained import find_tokenizer, is_run_dir, load_pretrained

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORDS = ("the cat dog sat ran on under mat rug red blue big small and then a".split())


def _word_tokenizer(path, specials):
    """A word-level tokenizer.json (specials first, then WORDS), built locally with `tokenizers`."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(list(specials) + list(WORDS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=specials[-1]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return tok


def _hf_gpt2(path):
    """A tiny random HF GPT-2 (sharp logits) saved with a tokenizer.json whose eos is <|endoftext|>."""
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=32, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=0,
                                  eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(8.0)  # far from greedy ties
    model.save_pretrained(path)
    _word_tokenizer(path / "tokenizer.json", ["<|endoftext|>", "<unk>"])
    return model


def _run_cli(*argv):
    proc = subprocess.run([sys.executable, "-m", "zoo", *argv], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


# ------------------------------------------------------------------------------ generate


@pytest.mark.torch
def test_generate_cli_prints_what_zoo_generate_gives(tmp_path, capsys):
    import zoo
    from zoo.__main__ import main

    _hf_gpt2(tmp_path)
    prompts = ["the cat sat on", "a big red dog ran under the"]
    tok = find_tokenizer(tmp_path)
    rows = [tok.encode(p) for p in prompts]
    ids, mask = pad_rows(rows, max(map(len, rows)))
    model, params = zoo.from_hf(tmp_path)

    # Sampling flags, through a real `python -m zoo` process.
    out = _run_cli("generate", "--model", str(tmp_path), "--prompt", prompts[0], "--prompt", prompts[1],
                   "--max-new-tokens", "12", "--temperature", "0.9", "--top-k", "8", "--top-p", "0.95", "--seed",
                   "3", "--num-return-sequences", "2", "--jsonl")
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    ref = np.asarray(zoo.generate(model, params, ids, mask, max_new_tokens=12, temperature=0.9, top_k=8, top_p=0.95,
                                  seed=3, stop_tokens=(tok.eos_id,), num_return_sequences=2,
                                  vocab_limit=tok.vocab_size))  # the CLI samples only ids its tokenizer decodes
    assert len(lines) == 4
    for r, line in enumerate(lines):
        row = [int(t) for t in ref[r]]
        row = row[: row.index(tok.eos_id)] if tok.eos_id in row else row
        assert line["token_ids"] == row
        assert line["prompt"] == prompts[r // 2] and line["sample"] == r % 2
        assert line["text"] == prompts[r // 2] + tok.decode(row)

    # Greedy, human-readable output, in process.
    assert main(["generate", "--model", str(tmp_path), "--prompt", prompts[1], "--max-new-tokens", "10"]) == 0
    printed = capsys.readouterr().out.splitlines()
    greedy = [int(t) for t in np.asarray(zoo.generate(model, params, ids[1:], mask[1:], max_new_tokens=10,
                                                      stop_tokens=(tok.eos_id,), vocab_limit=tok.vocab_size))[0]]
    greedy = greedy[: greedy.index(tok.eos_id)] if tok.eos_id in greedy else greedy
    assert printed == ["=== prompt 1/1, sample 1/1 ===", prompts[1] + tok.decode(greedy)]


# ---------------------------------------------------------------------------------- eval


@pytest.mark.torch
def test_eval_perplexity_equals_transformers_nll(tmp_path):
    """`python -m zoo eval` perplexity = exp(token-weighted mean NLL) from PyTorch, <= 1e-4 relative."""
    import torch
    from tokenizers import Tokenizer

    hf = _hf_gpt2(tmp_path / "model")
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, n)) for n in (40, 23)]
    for i, text in enumerate(texts):
        (tmp_path / f"doc{i}.txt").write_text(text + "\n")

    tok = Tokenizer.from_file(str(tmp_path / "model" / "tokenizer.json"))
    nll = count = 0.0
    for text in texts:
        ids = torch.tensor([tok.encode(text).ids])
        with torch.no_grad():
            loss = hf(input_ids=ids, labels=ids).loss.item()  # mean over the len - 1 predicted tokens
        nll += loss * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    expected = math.exp(nll / count)

    out = _run_cli("eval", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "doc0.txt"),
                   str(tmp_path / "doc1.txt"), "--json", "--no-progress")
    metrics = json.loads(out.strip().splitlines()[-1])
    assert metrics["task"] == "perplexity" and metrics["tokens"] == count and metrics["documents"] == 2
    assert abs(metrics["perplexity"] - expected) / expected <= 1e-4, (metrics["perplexity"], expected)


def test_eval_bad_input_is_one_line_exit_2(tmp_path, capsys):
    from zoo.__main__ import main

    assert main(["eval", "--model", str(tmp_path / "missing"), "--data", "x.txt"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("python -m zoo eval: error:") and "does not exist" in err[0]
    (tmp_path / "empty").mkdir()
    assert main(["generate", "--model", str(tmp_path / "empty"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "neither an HF checkpoint dir" in err[0]


# ------------------------------------------------------------------------------- convert


@pytest.mark.torch
def test_convert_hf_to_zoo_and_back_is_identical_and_loads_in_transformers(tmp_path, capsys):
    import torch
    import transformers
    from safetensors.numpy import load_file

    from zoo.__main__ import main

    hf = _hf_gpt2(tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "zoo")]) == 0
    assert (tmp_path / "zoo" / "checkpoints" / "0" / "state").is_dir()
    assert (tmp_path / "zoo" / "tokenizer.json").is_file() and is_run_dir(tmp_path / "zoo")
    assert main(["convert", str(tmp_path / "zoo"), str(tmp_path / "back")]) == 0

    original = load_file(str(tmp_path / "hf" / "model.safetensors"))
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert set(back) == set(original), set(back) ^ set(original)
    for key, value in original.items():
        assert back[key].dtype == value.dtype and np.array_equal(back[key], value), key

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    ids = torch.tensor([[3, 5, 7, 11, 13]])
    with torch.no_grad():
        np.testing.assert_array_equal(reloaded(ids).logits.numpy(), hf(ids).logits.numpy())

    # generate reads the zoo dir exactly as the HF dir it came from
    capsys.readouterr()
    outputs = []
    for d in ("hf", "zoo"):
        assert main(["generate", "--model", str(tmp_path / d), "--prompt", "the cat", "--max-new-tokens", "6"]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "zoo")]) == 2  # never overwrites checkpoints


@pytest.mark.torch
def test_convert_train_py_run_to_hf(tmp_path, capsys):
    """A `train.py` pretraining run (args.json + orbax checkpoint + sentencepiece) -> HF dir -> transformers."""
    import torch
    import transformers

    import train
    import zoo
    from zoo.__main__ import main

    rng = np.random.default_rng(0)
    with open(tmp_path / "docs.jsonl", "w") as f:
        for _ in range(100):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS, rng.integers(5, 30)))}) + "\n")
    run = tmp_path / "run"
    result = train.main(["--model", "tiny-gpt2", "--data", str(tmp_path / "docs.jsonl"), "--steps", "2",
                         "--batch-size", "8", "--seq-len", "32", "--sample-tokens", "0",
                         "--out", str(run), "--no-progress"])
    assert isinstance(result, dict)
    assert main(["convert", str(run), str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "tokenizer.model").is_file()

    pre = load_pretrained(run)
    assert pre.cfg == zoo.config("tiny-gpt2", dtype="float32", param_dtype="float32")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = np.array([[5, 9, 17, 33, 65, 100]])
    with torch.no_grad():
        expected = hf(torch.tensor(ids)).logits.numpy()
    ours = np.asarray(pre.model.apply({"params": pre.params}, ids))
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=1e-4)
    capsys.readouterr()
    (tmp_path / "held_out.txt").write_text("the cat sat on the mat and then the dog ran under a big red rug\n")
    assert main(["eval", "--model", str(run), "--data", str(tmp_path / "held_out.txt"), "--json",
                 "--no-progress"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["task"] == "perplexity" and math.isfinite(metrics["perplexity"]) and metrics["perplexity"] > 1
