"""train.py (pretraining and fine-tuning) as a new user meets it: output directories it must
not harm, inputs that must be refused with one line (status 2) before anything is written or
compiled, and what the end of a run needs checked at its start. Issue 12's cases, one test
each; the output dir is compared file by file before and after."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train
import zoo
from zoo import data
from zoo.paths import RunLock
from zoo.training.config import DEFAULT_PROMPT, TrainConfig, UsageError
from zoo.training.run_dir import check_resume_flags

from run_utils import snapshot

SYNTH = ["--model", "tiny-llama", "--data", "synthetic", "--seq-len", "32", "--batch-size", "8",
         "--sample-tokens", "0", "--no-progress"]


def _refused(capsys, argv, *needles) -> str:
    status = train.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2, err
    assert len(err) == 1 and err[0].startswith("train.py: error: "), err
    for needle in needles:
        assert needle in err[0], err[0]
    return err[0]


# ------------------------------------------------------------------- output directories


def test_out_that_holds_other_files_is_refused_untouched(tmp_path, capsys, no_compile):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    before = snapshot(out)
    _refused(capsys, [*SYNTH, "--out", str(out)], f"--out {out} is not empty", "'notes.txt'")
    assert snapshot(out) == before


def test_out_that_is_a_file_or_under_a_file_is_refused(tmp_path, capsys, no_compile):
    f = tmp_path / "file"
    f.write_text("x")
    _refused(capsys, [*SYNTH, "--out", str(f)], "is a file")
    _refused(capsys, [*SYNTH, "--out", str(f / "sub")], "is a file, not a directory")
    assert f.read_text() == "x"


def test_out_held_by_another_run_is_refused(tmp_path, capsys, no_compile):
    out = tmp_path / "run"
    lock = RunLock(out)
    try:
        before = snapshot(out)
        _refused(capsys, [*SYNTH, "--out", str(out)], f"--out {out} is in use by pid {os.getpid()}")
        assert snapshot(out) == before
    finally:
        lock.release()


def test_a_refused_run_leaves_no_directory_behind(tmp_path, capsys):
    (tmp_path / "blank.txt").write_text("  \n\t\n")
    out = tmp_path / "new"
    _refused(capsys, ["--model", "tiny-llama", "--data", str(tmp_path / "blank.txt"), "--out", str(out)],
             f"no text in {tmp_path / 'blank.txt'}")
    assert not out.exists()


def test_relative_out_and_data_are_resolved_once(tmp_path, monkeypatch):
    (tmp_path / "corpus.txt").write_text("hello world\n" * 200)
    monkeypatch.chdir(tmp_path)
    args = TrainConfig.from_args(["--data", "corpus.txt", "--out", "runs/x", "--tokenizer", "t.model",
                                  "--init", "runs/classify", "--eval-data", "dev.jsonl"])
    assert args.out == str(tmp_path / "runs" / "x")
    assert args.init == str(tmp_path / "runs" / "classify") and args.eval_data == [str(tmp_path / "dev.jsonl")]
    assert args.data == [str(tmp_path / "corpus.txt")]
    assert args.tokenizer == str(tmp_path / "t.model")
    parsed = TrainConfig.from_args(["--data", "stdlib", "synthetic"])
    assert parsed.data == ["stdlib", "synthetic"]  # keywords are not paths


# ----------------------------------------------------------------------------- data


def test_whitespace_text_and_empty_jsonl_texts_are_refused(tmp_path, capsys, no_compile):
    (tmp_path / "ws.txt").write_text("   \n\n \n")
    (tmp_path / "empty.jsonl").write_text('{"text": ""}\n{"text": "   "}\n')
    tok = tmp_path / "tok.model"
    data.train_tokenizer(["some text to learn a few pieces from\n" * 50], tok, vocab_size=300)
    for name in ("ws.txt", "empty.jsonl"):
        for extra in ([], ["--tokenizer", str(tok)]):
            out = tmp_path / f"out-{name}-{len(extra)}"
            _refused(capsys, ["--model", "tiny-llama", "--data", str(tmp_path / name), "--out", str(out), *extra],
                     f"no text in {tmp_path / name}")
            assert not out.exists()


def test_jsonl_with_a_byte_order_mark_reads_like_without(tmp_path):
    lines = '{"text": "first document"}\n{"text": "second"}\n'
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + lines.encode())
    (tmp_path / "plain.jsonl").write_text(lines)
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfplain text\n")
    bom = data.DocumentSource([str(tmp_path / "bom.jsonl")])
    plain = data.DocumentSource([str(tmp_path / "plain.jsonl")])
    assert [bom[i] for i in range(len(bom))] == [plain[i] for i in range(len(plain))] == ["first document", "second"]
    assert data.DocumentSource([str(tmp_path / "bom.txt")])[0] == "plain text\n"
    # The one reader fine-tuning and eval use agrees.
    assert data.read_jsonl(tmp_path / "bom.jsonl", ("text",)) == data.read_jsonl(tmp_path / "plain.jsonl", ("text",))


def test_jsonl_records_with_blank_text_are_skipped(tmp_path):
    (tmp_path / "mixed.jsonl").write_text('{"text": ""}\n{"text": "kept"}\n{"text": " "}\n')
    source = data.DocumentSource([str(tmp_path / "mixed.jsonl")])
    assert len(source) == 1 and source[0] == "kept"


def test_a_corpus_too_small_for_any_tokenizer_is_one_line(tmp_path, capsys, monkeypatch):
    (tmp_path / "tiny.txt").write_text("abc")

    def refuse(*a, **k):  # what sentencepiece raises when the text cannot make the vocabulary
        raise RuntimeError("Internal: src/trainer_interface.cc(660) [(trainer_spec_.vocab_size()) == "
                           "(model_proto->pieces_size())] Vocabulary size too high (512). Please set it to a value "
                           "<= 260.")

    monkeypatch.setattr(data, "train_tokenizer", refuse)
    out = tmp_path / "out"
    _refused(capsys, ["--model", "tiny-llama", "--data", str(tmp_path / "tiny.txt"), "--out", str(out)],
             "--data: cannot train a", "Vocabulary size too high", "pass more text or --tokenizer")
    assert not out.exists()  # not even the lock file


def test_sampling_never_picks_ids_the_tokenizer_cannot_decode():
    cfg = zoo.config("tiny-llama")
    model = zoo.build(cfg)
    params = model.init(jax.random.PRNGKey(0), np.zeros((1, 4), np.int32))["params"]
    limit = 7
    new = zoo.generate(model, params, np.array([[1, 2, 3]]), max_new_tokens=40, temperature=5.0, seed=0,
                       num_return_sequences=4, vocab_limit=limit, top_k=10**6)  # top_k clamps to the limit
    assert np.asarray(new).max() < limit
    unlimited = zoo.generate(model, params, np.array([[1, 2, 3]]), max_new_tokens=40, temperature=5.0, seed=0,
                             num_return_sequences=4)
    assert np.asarray(unlimited).max() >= limit  # the control: without the limit such ids do come up


def test_three_byte_corpus_trains_and_samples(tmp_path, capsys):
    (tmp_path / "tiny.txt").write_text("abc")
    out = tmp_path / "out"
    summary = train.main(["--model", "tiny-llama", "--data", str(tmp_path / "tiny.txt"), "--out", str(out),
                          "--steps", "2", "--seq-len", "16", "--batch-size", "8", "--sample-tokens", "20",
                          "--no-progress", "--temperature", "2.0"])
    assert isinstance(summary, dict), capsys.readouterr().err
    assert summary["sample"].startswith(DEFAULT_PROMPT)
    tok = data.Tokenizer(out / "tokenizer.model")
    assert tok.vocab_size < zoo.config("tiny-llama").vocab_size  # the case: a padded model vocabulary


# ------------------------------------------------------------ checked before the first step


def test_sample_longer_than_the_positions_is_refused_before_training(tmp_path, capsys, no_compile):
    out = tmp_path / "out"
    (tmp_path / "c.txt").write_text("word " * 400)
    _refused(capsys, ["--model", "tiny-gpt2", "--data", str(tmp_path / "c.txt"), "--sample-tokens", "300",
                      "--out", str(out)], "--sample-tokens 300", "256 positions")
    assert not out.exists()
    tok = tmp_path / "tok.model"
    data.train_tokenizer(["word " * 400], tok, vocab_size=300)
    prompt = "word " * 100
    _refused(capsys, ["--model", "tiny-gpt2", "--data", str(tmp_path / "c.txt"), "--tokenizer", str(tok),
                      "--sample-prompt", prompt, "--sample-tokens", "200", "--out", str(out)],
             "--sample-prompt (", "+ --sample-tokens 200 exceed the 256 positions")
    assert not out.exists()


def test_coordinator_must_be_host_port(capsys, no_compile):
    _refused(capsys, [*SYNTH, "--coordinator", "notaport", "--num-processes", "2", "--process-id", "0"],
             "--coordinator", "HOST:PORT")
    _refused(capsys, [*SYNTH, "--coordinator", "host:99999", "--num-processes", "2", "--process-id", "0"],
             "'host:99999'")


def _saved_run(out, **flags) -> None:
    """<out>/args.json as train.py writes it (the flag check reads only that and the step)."""
    out.mkdir(parents=True)
    args = _parsed(SYNTH + [f"--{k.replace('_', '-')}={v}" for k, v in flags.items()] + ["--out", str(out)]).to_json()
    (out / "args.json").write_text(json.dumps(args))


def test_resume_with_changed_schedule_or_shape_flags_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    _saved_run(out, steps=10, lr=0.005)
    for flag, value, old in (("--steps", "20", "10"), ("--seq-len", "64", "32"), ("--batch-size", "16", "8"),
                             ("--lr", "0.01", "0.005")):
        args = _parsed([*SYNTH, "--steps", "10", "--lr", "0.005", flag, value, "--out", str(out)])
        with pytest.raises(UsageError) as e:
            check_resume_flags(args, 5, args.steps)
        shown = float(value) if flag == "--lr" else value
        assert f"{flag} {shown} differs from {old}" in str(e.value) and "--allow-flag-changes" in str(e.value)
    # A finished run only samples: nothing it trained can change.
    check_resume_flags(_parsed([*SYNTH, "--steps", "10", "--seq-len", "64", "--out", str(out)]), 10, 10)
    # A fixed --decay-steps keeps the schedule: --steps may grow.
    _saved_run(tmp_path / "fixed", steps=10, decay_steps=100)
    check_resume_flags(_parsed([*SYNTH, "--steps", "50", "--decay-steps", "100", "--out",
                                str(tmp_path / "fixed")]), 5, 50)


def test_allow_flag_changes_lets_the_resume_through(tmp_path, capsys):
    out = tmp_path / "run"
    _saved_run(out, steps=10)
    check_resume_flags(_parsed([*SYNTH, "--steps", "20", "--allow-flag-changes", "--out", str(out)]), 5, 20)
    assert "resuming with --steps 20 instead of 10" in capsys.readouterr().out


def _parsed(argv):
    return TrainConfig.from_args(argv)


# ------------------------------------------------------------------------- fine-tuning


@pytest.fixture(scope="module")
def classify_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("classify")
    tok = d / "tok.model"
    data.train_tokenizer(["good bad fine awful nice terrible movie film\n" * 40], tok, vocab_size=300)
    rows = [{"text": "good movie", "label": 0}, {"text": "bad film", "label": 1}] * 4
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d, tok


def _finetune_argv(d, tok, out, *extra):
    return ["--task", "classify", "--model", "tiny-bert", "--tokenizer", str(tok), "--data", str(d / "train.jsonl"),
            "--out", str(out), "--batch-size", "8", "--seq-len", "16", "--no-progress", *extra]


def test_finetune_out_must_be_new_or_empty(classify_files, tmp_path, capsys, no_compile):
    d, tok = classify_files
    out = tmp_path / "ft"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    before = snapshot(out)
    _refused(capsys, _finetune_argv(d, tok, out), f"--out {out} is not empty")
    assert snapshot(out) == before


def test_finetune_out_may_not_be_the_init_dir(tmp_path, capsys, no_compile):
    init = tmp_path / "init"
    init.mkdir()
    (init / "config.json").write_text("{}")
    before = snapshot(init)
    (tmp_path / "t.jsonl").write_text('{"text": "a", "label": 0}\n')
    _refused(capsys, ["--task", "classify", "--init", str(init), "--data", str(tmp_path / "t.jsonl"),
                      "--out", str(init)], "overlaps the source")
    assert snapshot(init) == before


def test_finetune_names_the_flag_of_a_missing_path(classify_files, tmp_path, capsys, no_compile):
    d, tok = classify_files
    missing = tmp_path / "nope.jsonl"
    _refused(capsys, _finetune_argv(d, tok, tmp_path / "a", "--eval-data", str(missing)),
             f"--eval-data path does not exist: {missing}")
    _refused(capsys, ["--task", "classify", "--init", str(tmp_path / "no-init"), "--data", str(d / "train.jsonl"),
                      "--out", str(tmp_path / "b")], f"--init {tmp_path / 'no-init'}: no such model dir")


def test_finetune_bad_labels_name_file_and_line(classify_files, tmp_path, capsys, no_compile):
    d, tok = classify_files
    dev = tmp_path / "dev.jsonl"
    dev.write_text('{"text": "good", "label": 0}\n{"text": "odd", "label": 7}\n')
    _refused(capsys, _finetune_argv(d, tok, tmp_path / "a", "--eval-data", str(dev)),
             f"{dev}:2: label 7 never occurs in --data (classes [0, 1])")
    neg = tmp_path / "neg.jsonl"
    neg.write_text('{"text": "good", "label": 0}\n\n{"text": "bad", "label": -1}\n')
    _refused(capsys, _finetune_argv(d, tok, tmp_path / "b", "--eval-data", str(neg)),
             f"{neg}:3: label -1 is not a class id")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ------------------------------------------------------------------- --override


@pytest.mark.parametrize("override, needle", [
    ("nope=1", "--override nope: the llama config 'tiny-llama' has no field 'nope'"),
    ("num_layers", "--override 'num_layers': expected FIELD=VALUE"),
    ("num_layers=two", "--override num_layers=two: expected a value of type int"),
    ("tie_word_embeddings=maybe", "--override tie_word_embeddings=maybe: expected a value of type bool"),
    ("num_layers=0", "num_layers"),  # the config's own check
])
def test_bad_overrides_are_one_line_and_write_nothing(tmp_path, capsys, no_compile, override, needle):
    out = tmp_path / "run"
    _refused(capsys, [*SYNTH, "--out", str(out), "--override", override], needle)
    assert not out.exists()


def test_overrides_rederive_what_the_config_derived():
    """An override of the sizes derives head_dim / num_kv_heads again where the config had derived
    them (and keeps them where they were set); "null" is None for any field."""
    from zoo.configs import with_overrides

    cfg = with_overrides(zoo.config("tiny-llama"), {"hidden_size": "128"})
    assert (cfg.head_dim, cfg.num_kv_heads) == (32, zoo.config("tiny-llama").num_kv_heads)
    cfg = with_overrides(zoo.config("tiny-deepseek"), {"qk_rope_head_dim": "32", "num_heads": "8",
                                                        "q_lora_rank": "null"})
    assert (cfg.head_dim, cfg.num_kv_heads, cfg.q_lora_rank) == (48, 8, None)
    assert with_overrides(zoo.config("gemma2-2b"), {"intermediate_size": "1024"}).head_dim == 256  # set, kept


def test_overrides_take_each_field_type():
    from zoo.training.pretrain import load_model_config

    config = TrainConfig.from_args(["--model", "tiny-deepseek", "--override", "num_mtp_layers=2", "bias_update_rate=0",
                                "norm_topk_prob=false", "kv_cache=full", "rope_scaling=null", "--remat", "full"])
    cfg = load_model_config(config.model, config.model_overrides())
    assert (cfg.num_mtp_layers, cfg.bias_update_rate, cfg.norm_topk_prob, cfg.kv_cache, cfg.rope_scaling,
            cfg.remat) == (2, 0.0, False, "full", None, "full")
    assert isinstance(cfg.bias_update_rate, float) and not cfg.balances_routers
    assert zoo.param_count(cfg) > zoo.param_count(zoo.config("tiny-deepseek"))


def test_a_run_with_overrides_loads_back_with_them(tmp_path):
    """The run dir's args.json keeps --override, so zoo.pretrained (eval, generate, convert) rebuilds
    the model the run trained: here with its MTP depth."""
    from zoo.pretrained import load_pretrained

    out = tmp_path / "run"
    argv = ["--model", "tiny-deepseek", "--data", "synthetic", "--seq-len", "32", "--batch-size", "8",
            "--sample-tokens", "0", "--no-progress", "--steps", "2", "--out", str(out),
            "--override", "num_mtp_layers=1", "mtp_loss_weight=0.5"]
    summary = train.main(argv)
    assert summary["last_step"] == 2, summary
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["mtp_loss"] > 1.0
    loaded = load_pretrained(out)
    assert (loaded.model.cfg.num_mtp_layers, loaded.model.cfg.mtp_loss_weight) == (1, 0.5)
    assert "mtp_0" in loaded.params
    (out / "zoo_config.json").unlink()  # a run dir with args.json only: the config is rebuilt from the flags
    rebuilt = load_pretrained(out, dtype="bfloat16")
    assert rebuilt.model.cfg == loaded.model.cfg.replace(dtype="bfloat16", param_dtype="bfloat16")
    assert rebuilt.params["layers"]["mlp"]["correction_bias"].dtype == jnp.float32  # kept float32
    assert rebuilt.params["layers"]["mlp"]["router"]["kernel"].dtype == jnp.bfloat16
