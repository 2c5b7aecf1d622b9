"""`python -m zoo` with paths and flags users get wrong (issue 12): each refusal is one line
`python -m zoo <cmd>: error: ...` naming the flag or file, exit status 2, nothing written or
lost; relative paths work from any working directory.

One tiny `train.py` run (tiny-llama, 2 steps) is built per module and only ever read;
every test writes under its own tmp_path. No torch needed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from zoo import __main__ as cli
from zoo.eval import perplexity
from zoo.pretrained import (
    EvalError,
    find_tokenizer,
    is_hf_dir,
    is_run_dir,
    latest_checkpoint,
    load_pretrained,
    restore_params,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORDS = "the cat dog sat ran on under mat rug red blue big small and then a".split()


def _text(n_words: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(WORDS, n_words))


def _snapshot(*paths) -> dict:
    """Every file and dir under `paths`: (kind, size, mtime_ns, mode) by path."""
    out = {}
    for root in paths:
        root = str(root)
        if not os.path.lexists(root):
            out[root] = None
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            for name in [""] + dirnames + filenames:
                p = os.path.join(dirpath, name) if name else dirpath
                st = os.lstat(p)
                out[p] = (os.path.isdir(p), st.st_size, st.st_mtime_ns, st.st_mode)
    return out


def _one_error(text: str, command: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert len(lines) == 1, text
    assert lines[0].startswith(f"python -m zoo {command}: error: "), lines[0]
    assert "Traceback" not in text
    return lines[0]


def _refused(capsys, argv, *needles) -> str:
    from zoo.__main__ import main

    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse
        rc = e.code
    assert rc == 2
    line = _one_error(capsys.readouterr().err, argv[0])
    for needle in needles:
        assert needle in line, (needle, line)
    return line


def _ok(capsys, argv) -> tuple[str, str]:
    from zoo.__main__ import main

    capsys.readouterr()
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 0, err
    return out, err


def _cli(argv, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zoo", *argv], capture_output=True, text=True, cwd=cwd,
                          timeout=300, env={**os.environ, "PYTHONPATH": ROOT})


def _boom(*args, **kwargs):
    raise AssertionError("loaded a model although the command should have refused first")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny zoo run dir (train.py --out): args.json, zoo_config.json, tokenizer.model (364 pieces),
    checkpoints/2/state; tiny-llama: vocab 512, 256 positions."""
    root = tmp_path_factory.mktemp("cli_paths")
    (root / "train.txt").write_text("\n".join(_text(20, s) for s in range(200)) + "\n")
    proc = subprocess.run([sys.executable, "train.py", "--model", "tiny-llama", "--data", str(root / "train.txt"),
                           "--steps", "2", "--seq-len", "32", "--batch-size", "8", "--sample-tokens", "0",
                           "--no-progress", "--checkpoint-every", "2", "--out", str(root / "run")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "run"


@pytest.fixture(scope="module")
def hf(run, tmp_path_factory):
    """The run converted to an HF dir (config.json + model.safetensors + tokenizer files)."""
    from zoo.__main__ import main

    out = tmp_path_factory.mktemp("cli_paths_hf") / "hf"
    assert main(["convert", str(run), str(out)]) == 0
    assert is_hf_dir(out)
    return out


@pytest.fixture
def held_out(tmp_path):
    path = tmp_path / "held_out.txt"
    path.write_text(_text(60, 1) + "\n")
    return path


# -------------------------------------------------------------------- 1: convert never loses data


@pytest.mark.parametrize("direction", ["zoo->hf", "hf->zoo"])
def test_convert_refuses_unsafe_out_before_loading(direction, run, hf, tmp_path, monkeypatch, capsys):
    import zoo

    src = run if direction == "zoo->hf" else hf
    monkeypatch.setattr(cli, "load_pretrained", _boom)
    monkeypatch.setattr(zoo, "from_hf", _boom)
    watched = (src, tmp_path)
    beside_src = sorted(os.listdir(src.parent))

    # a non-empty OUT: its files stay
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    before = _snapshot(*watched)
    _refused(capsys, ["convert", str(src), str(tmp_path / "other")], "OUT", "not empty")
    # OUT is a file: not replaced by a dir
    (tmp_path / "file.bin").write_text("data")
    before = _snapshot(*watched)
    _refused(capsys, ["convert", str(src), str(tmp_path / "file.bin")], "OUT", "is a file")
    # OUT is the source, or inside it: the source is never touched
    _refused(capsys, ["convert", str(src), str(src)], "OUT", "overlaps the source")
    _refused(capsys, ["convert", str(src), str(src / "export")], "OUT", "overlaps the source")
    # `.` holding the source (overlap), `.` holding other files (not empty), `sub/..` (= `.`)
    monkeypatch.chdir(src.parent)
    _refused(capsys, ["convert", str(src), "."], "OUT .", "overlaps")
    monkeypatch.chdir(tmp_path)
    _refused(capsys, ["convert", str(src), "."], "OUT .", "not empty")
    _refused(capsys, ["convert", str(src), "other/.."], "OUT other/..", "not empty")
    assert _snapshot(*watched) == before
    assert sorted(os.listdir(tmp_path)) == ["file.bin", "other"]  # no *.old-* / *.tmp-* leftovers
    assert sorted(os.listdir(src.parent)) == beside_src
    assert (tmp_path / "other" / "keep.txt").read_text() == "mine"
    assert (tmp_path / "file.bin").read_text() == "data"


def test_convert_into_empty_dir_both_ways_leaves_source_untouched(run, hf, tmp_path, capsys):
    import jax

    before = _snapshot(run, hf)
    (tmp_path / "hf").mkdir()  # an empty dir is fine
    _ok(capsys, ["convert", str(run), str(tmp_path / "hf")])
    assert {"config.json", "model.safetensors", "tokenizer.model"} <= set(os.listdir(tmp_path / "hf"))
    _ok(capsys, ["convert", str(hf), str(tmp_path / "zoo")])
    assert is_run_dir(tmp_path / "zoo") and (tmp_path / "zoo" / "checkpoints" / "0" / "state").is_dir()
    assert _snapshot(run, hf) == before
    assert sorted(os.listdir(tmp_path)) == ["hf", "zoo"]  # nothing staged left behind

    # the staged (renamed) checkpoint restores to the same weights
    a, b = load_pretrained(run), load_pretrained(tmp_path / "zoo")
    assert a.cfg.vocab_size == b.cfg.vocab_size
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_convert_hf_to_zoo_failure_leaves_nothing(hf, tmp_path, monkeypatch, capsys):
    from zoo import checkpoint

    def full_disk(self, *args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "zoo" / "checkpoints"))

    monkeypatch.setattr(checkpoint.Checkpointer, "save", full_disk)
    before = _snapshot(hf)
    _refused(capsys, ["convert", str(hf), str(tmp_path / "zoo")], "No space left on device")
    assert os.listdir(tmp_path) == []  # neither OUT nor a staging dir
    assert _snapshot(hf) == before


# ------------------------------------------------------------------------- 2: relative paths


def test_relative_paths_from_repo_root_and_another_dir(run, held_out, tmp_path, monkeypatch, capsys):
    # separate processes: generate from the repo root, eval from the data's dir
    proc = _cli(["generate", "--model", os.path.relpath(run, ROOT), "--prompt", "the cat", "--max-new-tokens", "4"],
                cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("=== prompt 1/1, sample 1/1 ===\nthe cat")
    rel_run = os.path.relpath(run, tmp_path)
    proc = _cli(["eval", "--model", rel_run, "--data", held_out.name, "--predictions", "preds/p.jsonl", "--json",
                 "--no-progress"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.splitlines()[-1])["task"] == "perplexity"
    assert len((tmp_path / "preds" / "p.jsonl").read_text().splitlines()) == 1

    # convert both ways with relative dirs, then generate from the converted relative dir
    monkeypatch.chdir(tmp_path)
    _ok(capsys, ["convert", rel_run, "hf"])
    _ok(capsys, ["convert", "hf", "zoo"])
    out, _ = _ok(capsys, ["generate", "--model", "zoo", "--prompt", "the cat", "--max-new-tokens", "4"])
    assert out.startswith("=== prompt 1/1, sample 1/1 ===\nthe cat")
    out, _ = _ok(capsys, ["eval", "--model", "zoo", "--tokenizer", "hf/tokenizer.model", "--data", held_out.name,
                          "--json", "--no-progress"])
    assert math.isfinite(json.loads(out.splitlines()[-1])["perplexity"])
    # the library entry points resolve too
    pre = load_pretrained("zoo")
    assert restore_params(os.path.relpath(latest_checkpoint(pre.path), tmp_path))


# ---------------------------------------------------------------------- 3: long prompts


def test_generate_keeps_the_end_of_a_long_prompt(run, capsys):
    import zoo

    tok = find_tokenizer(run)
    prompt = _text(400, 2)
    full = tok.encode(prompt)
    assert len(full) > 256  # longer than all of tiny-llama's positions
    out, err = _ok(capsys, ["generate", "--model", str(run), "--prompt", prompt, "--max-new-tokens", "248",
                            "--jsonl"])
    assert f"prompt 1 is {len(full)} tokens; kept its last 8" in err
    line = json.loads(out.splitlines()[-1])
    assert line["prompt_tokens"] == len(full) and line["prompt_tokens_kept"] == 8

    pre = load_pretrained(run)
    ref = [int(t) for t in np.asarray(zoo.generate(pre.model, pre.params, np.asarray([full[-8:]]),
                                                   max_new_tokens=248, stop_tokens=(tok.eos_id,),
                                                   vocab_limit=tok.vocab_size))[0]]
    ref = ref[: ref.index(tok.eos_id)] if tok.eos_id in ref else ref
    assert line["token_ids"] == ref  # continues the prompt's end
    assert line["text"] == tok.decode(full[-8:]) + line["completion"]  # printed as the model saw it

    out, _ = _ok(capsys, ["generate", "--model", str(run), "--prompt", prompt, "--max-new-tokens", "248"])
    assert out.splitlines()[0] == f"=== prompt 1/1 (cut to its last 8 of {len(full)} tokens), sample 1/1 ==="
    _refused(capsys, ["generate", "--model", str(run), "--prompt", "the cat", "--max-new-tokens", "256"],
             "--max-new-tokens 256", "256 positions")


# ------------------------------------------------------------ 4: tokenizer larger than the model


def _big_tokenizer(path, size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    vocab.update({f"w{i}": i for i in range(len(vocab), size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return path


def test_tokenizer_larger_than_the_model_vocab_is_refused(run, held_out, tmp_path, capsys):
    big = _big_tokenizer(tmp_path / "big.json", 600)
    held_out.write_text(" ".join(f"w{i}" for i in range(520, 560)) + "\n")  # ids past the model's 512
    for argv in (["eval", "--data", str(held_out), "--predictions", str(tmp_path / "p.jsonl")],
                 ["generate", "--prompt", "w599"]):
        line = _refused(capsys, [argv[0], "--model", str(run), "--tokenizer", str(big), *argv[1:]], "600", "512",
                        f"--tokenizer {big}")
        assert "perplexity" not in line
    assert not (tmp_path / "p.jsonl").exists()
    # the library refuses ids past the vocabulary too, instead of returning NaN
    pre = load_pretrained(run)
    with pytest.raises(EvalError, match="outside the model's vocabulary"):
        perplexity(pre.model, pre.params, [[1, 2, 530]], seq_len=16, progress=False)


def test_generate_samples_only_ids_the_tokenizer_decodes(run, capsys):
    tok = find_tokenizer(run)
    assert tok.vocab_size < 512  # the model's vocabulary is padded past the tokenizer's
    out, _ = _ok(capsys, ["generate", "--model", str(run), "--prompt", "the cat", "--max-new-tokens", "48",
                          "--temperature", "1.5", "--seed", "1", "--jsonl"])
    line = json.loads(out.splitlines()[-1])
    assert line["token_ids"] and max(line["token_ids"]) < tok.vocab_size


# ------------------------------------------------------------------- 5: eval --predictions


def test_eval_perplexity_writes_one_record_per_document(run, tmp_path, capsys):
    (tmp_path / "a.txt").write_text(_text(50, 3) + "\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": _text(30, 4)}) + "\n" + json.dumps({"text": "the"}) +
                                      "\n" + json.dumps({"text": _text(12, 5)}) + "\n")
    preds = tmp_path / "preds.jsonl"
    out, _ = _ok(capsys, ["eval", "--model", str(run), "--data", str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl"),
                          "--seq-len", "16", "--predictions", str(preds), "--json", "--no-progress"])
    metrics = json.loads(out.splitlines()[-1])
    records = [json.loads(line) for line in preds.read_text().splitlines()]
    assert [r["document"] for r in records] == list(range(metrics["documents"])) == [0, 1, 2, 3]
    assert [r["file"] for r in records] == [str(tmp_path / "a.txt")] + [str(tmp_path / "b.jsonl")] * 3
    assert sum(r["tokens"] for r in records) == metrics["tokens"]
    assert sum(r["windows"] for r in records) == metrics["windows"]
    assert sum(r["nll_sum"] for r in records) / metrics["tokens"] == pytest.approx(metrics["nll"], rel=1e-9)
    for r in records:
        if r["tokens"]:
            assert r["nll_mean"] == pytest.approx(r["nll_sum"] / r["tokens"])
        else:
            assert r["nll_mean"] is None and r["nll_sum"] == 0.0


def test_eval_unwritable_predictions_refused_before_loading(run, held_out, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "load_pretrained", _boom)
    (tmp_path / "a_dir").mkdir()
    (tmp_path / "a_file").write_text("x")
    before = _snapshot(tmp_path)
    base = ["eval", "--model", str(run), "--data", str(held_out), "--predictions"]
    _refused(capsys, base + [str(tmp_path / "a_dir")], f"--predictions {tmp_path / 'a_dir'}", "is a directory")
    _refused(capsys, base + [str(tmp_path / "a_file" / "sub" / "p.jsonl")], "--predictions", "is a file")
    _refused(capsys, base + [str(held_out)], "--predictions", "is an input")  # never overwrites the data
    if os.geteuid() != 0:  # root writes anywhere
        (tmp_path / "locked").mkdir(mode=0o500)
        _refused(capsys, base + [str(tmp_path / "locked" / "p.jsonl")], "--predictions", "permission denied")
        (tmp_path / "locked").rmdir()
    assert _snapshot(tmp_path) == before


# ------------------------------------------------------------------------ 6: sampling flags


def test_top_k_above_the_vocab_is_clamped(run, capsys):
    argv = ["generate", "--model", str(run), "--prompt", "the cat", "--max-new-tokens", "8", "--temperature", "1",
            "--seed", "3", "--jsonl"]
    huge, _ = _ok(capsys, argv + ["--top-k", "100000"])
    all_ids, _ = _ok(capsys, argv + ["--top-k", "512"])
    assert json.loads(huge.splitlines()[-1])["token_ids"] == json.loads(all_ids.splitlines()[-1])["token_ids"]


@pytest.mark.parametrize("flag,value", [("--top-p", "1.5"), ("--top-p", "0"), ("--top-p", "nan"),
                                        ("--temperature", "-1"), ("--temperature", "nan"), ("--top-k", "0"),
                                        ("--max-new-tokens", "-3")])
def test_sampling_flags_out_of_range_are_one_line(flag, value, capsys):
    _refused(capsys, ["generate", "--model", "m", "--prompt", "x", flag, value], f"argument {flag}", repr(value))


# --------------------------------------------------------------------------------- 7: help


def _help_entries(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each option's help as rendered (wrapped lines joined), by its first line."""
    entries, current = {}, None
    for line in parser.format_help().split("options:", 1)[1].splitlines():
        if line.startswith("  -"):
            current = line.strip().split()[0]
            entries[current] = line.strip()
        elif current is not None and line.startswith("   "):
            entries[current] += " " + line.strip()
    return entries


def test_help_states_each_default_once():
    from zoo.__main__ import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, sub in subparsers.items():
        entries = _help_entries(sub)
        assert entries, name
        for flag, text in entries.items():
            assert text.lower().count("default") <= 1, (name, flag, text)
            assert "(default: None)" not in text and "(default: False)" not in text, (name, flag, text)
        assert "(default: the one in --model)" in entries.get("--tokenizer", "(default: the one in --model)")
    assert "(default: 64)" in _help_entries(subparsers["generate"])["--max-new-tokens"]


# ------------------------------------------------------------------ 8: input paths, OSError


def test_bad_input_paths_name_their_flag(run, held_out, tmp_path, monkeypatch, capsys):
    missing = str(tmp_path / "missing")
    gen = ["generate", "--prompt", "x"]
    _refused(capsys, gen + ["--model", missing], f"--model {missing}", "does not exist")
    _refused(capsys, gen + ["--model", str(held_out)], f"--model {held_out}", "not a directory")
    _refused(capsys, gen + ["--model", str(run), "--tokenizer", missing], f"--tokenizer {missing}", "does not exist")
    _refused(capsys, gen + ["--model", str(run), "--tokenizer", str(tmp_path)], f"--tokenizer {tmp_path}",
             "is a directory")
    (tmp_path / "junk.json").write_text("not a tokenizer")
    _refused(capsys, gen + ["--model", str(run), "--tokenizer", str(tmp_path / "junk.json")],
             "cannot load tokenizer", "junk.json")
    _refused(capsys, ["convert", missing, str(tmp_path / "out")], f"SOURCE {missing}", "does not exist")
    _refused(capsys, ["convert", str(tmp_path), str(tmp_path / "out")], "SOURCE", "neither an HF checkpoint")
    _refused(capsys, ["generate", "--model", str(run)], "--prompt")  # argparse errors are one line too
    monkeypatch.setattr(cli, "load_pretrained", _boom)  # --data is checked before the model loads
    _refused(capsys, ["eval", "--model", str(run), "--data", missing], f"--data {missing}", "does not exist")
    (tmp_path / "empty_dir").mkdir()
    _refused(capsys, ["eval", "--model", str(run), "--data", str(tmp_path / "empty_dir")], "--data", "no data files")
    monkeypatch.undo()

    # an OSError anywhere below is one line naming the file, not a traceback
    def unreadable(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(held_out))

    monkeypatch.setattr(cli, "DocumentSource", unreadable)
    _refused(capsys, ["eval", "--model", str(run), "--data", str(held_out), "--no-progress"],
             f"{held_out}: Permission denied")
    assert not (tmp_path / "out").exists()
