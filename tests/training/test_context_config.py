"""The context mesh axis (`sequence` kept as its old name), the --context-parallel option down to the
model config, and `check_context`'s refusals: called directly, through pretrain, plan and fine-tuning
(nothing compiles), and once through `python train.py`."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import jax
import pytest

import train
import zoo
from zoo import registry
from zoo.sharding import RULES, make_mesh, parse_hybrid_mesh, parse_mesh
from zoo.training import finetune, plan, pretrain
from zoo.training.config import TrainConfig, UsageError
from zoo.training.context import check_context

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
needs_8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 fake CPU devices (tests/conftest.py)")


def test_sequence_is_an_alias_of_the_context_axis():
    assert parse_mesh("sequence=2,fsdp=-1", 8)["context"] == 2
    assert parse_mesh("context=2,fsdp=-1", 8) == parse_mesh("sequence=2,fsdp=-1", 8)
    assert "sequence" not in parse_mesh("sequence=2,fsdp=-1", 8)
    ici, dcn = parse_hybrid_mesh("dcn_sequence=2,fsdp=-1", 8)
    assert (dcn["context"], ici["context"], ici["fsdp"]) == (2, 1, 4)
    with pytest.raises(ValueError, match="twice"):
        parse_mesh("sequence=2,context=2,fsdp=-1", 8)
    assert dict(RULES)["length"] == "context"


@needs_8
def test_the_mesh_carries_context():
    mesh = make_mesh("sequence=2,fsdp=-1")
    assert "context" in mesh.axis_names and "sequence" not in mesh.axis_names
    assert (mesh.shape["context"], mesh.shape["fsdp"]) == (2, 4)


def test_context_parallel_option_reaches_the_model_config():
    assert zoo.config("tiny-llama").context_parallel == "allgather"
    with pytest.raises(ValueError, match="context_parallel"):
        zoo.config("tiny-llama", context_parallel="sideways")
    args = TrainConfig.from_args(["--context-parallel", "ring", "--model", "tiny-gpt2"])
    assert args.model_overrides()["context_parallel"] == "ring"
    assert pretrain.load_model_config("tiny-gpt2", args.model_overrides()).context_parallel == "ring"
    assert "context_parallel" not in TrainConfig.from_args([]).model_overrides()  # the model config's default
    over = TrainConfig.from_args(["--override", "context_parallel=ring"]).model_overrides()
    assert pretrain.load_model_config("tiny-deepseek", over).context_parallel == "ring"
    with pytest.raises(UsageError, match="--context-parallel"):
        TrainConfig.from_args(["--context-parallel", "sideways"])


def test_decoder_families_support_context_parallelism():
    assert set(registry.names(context_parallel=True)) == {"llama", "gemma", "gpt2", "moe", "deepseek"}


@pytest.fixture(scope="module")
def context2():
    if jax.device_count() < 8:
        pytest.skip("needs 8 fake CPU devices (tests/conftest.py)")
    return make_mesh("context=2,fsdp=-1")


def test_supported_runs_pass(context2):
    for name in ("tiny-llama", "tiny-gpt2", "tiny-deepseek", "tiny-mixtral", "tiny-gemma2"):
        check_context(zoo.config(name), "clm", context2, 32)
    # a ring whose window reaches at most one chunk back: 64 / 4 = 16 >= 16 - 1
    check_context(zoo.config("tiny-mistral", context_parallel="ring"), "clm", context2, 64)
    # without a context axis nothing is refused
    check_context(zoo.config("tiny-bert"), "mlm", make_mesh("fsdp=-1"), 30)


@pytest.mark.parametrize("name, overrides, objective, seq_len, words", [
    ("tiny-llama", {}, "clm", 30, "--seq-len 30 must divide by 2 x context = 4 (zig-zag chunks"),
    ("tiny-llama", {}, "mlm", 32, "trains --objective clm (causal LM), not mlm"),
    ("tiny-bert", {}, "mlm", 32, "models, not the bert model 'tiny-bert'"),
    ("tiny-t5", {}, "span", 32, "not the t5 model"),
    ("tiny-llama4", {}, "clm", 32, "has attn_temperature_tuning=True (Llama 4)"),
    ("tiny-llama4", {"attn_temperature_tuning": False}, "clm", 32, "has attention_chunk_size=16 (Llama 4)"),
    ("tiny-llama", {"attn_temperature_tuning": True}, "clm", 32, "attn_temperature_tuning"),
    ("tiny-deepseek", {"num_mtp_layers": 1}, "clm", 32, "num_mtp_layers=1"),
    ("tiny-mistral", {"context_parallel": "ring"}, "clm", 32,
     "ring context parallelism needs sliding_window - 1 <= seq_len / (2 x context)"),
    ("tiny-gemma2", {"context_parallel": "ring"}, "clm", 16, "sliding_window=8 and 16 / 4 = 4"),
])
def test_refusals(context2, name, overrides, objective, seq_len, words):
    with pytest.raises(ValueError) as e:
        check_context(zoo.config(name, **overrides), objective, context2, seq_len)
    assert words in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_allgather_takes_long_windows(context2):
    check_context(zoo.config("tiny-mistral"), "clm", context2, 32)  # 16 - 1 > 32 / 4, but allgather


def _no_compile(*a, **k):
    raise AssertionError("compiled despite a refused context axis")


def test_pretrain_plan_and_finetune_refuse(context2, monkeypatch, tmp_path):
    monkeypatch.setattr(pretrain, "make_trainer", _no_compile)
    monkeypatch.setattr(plan, "make_trainer", _no_compile)
    config = TrainConfig.from_args(["--mesh", "sequence=2,fsdp=-1", "--seq-len", "30", "--data", "synthetic",
                                    "--out", str(tmp_path / "run")])
    with pytest.raises(UsageError, match="--seq-len 30 must divide by 2 x context"):
        pretrain.resolve_inputs(config)
    with pytest.raises(plan.PlanError, match="--seq-len 30 must divide by 2 x context"):
        plan.plan(zoo.config("tiny-llama"), None, mesh="context=2,fsdp=-1", batch_size=8, seq_len=30)
    with pytest.raises(plan.PlanError, match="num_mtp_layers=1"):
        plan.plan(zoo.config("tiny-deepseek", num_mtp_layers=1), None, mesh="context=2,fsdp=-1", batch_size=8,
                  seq_len=32)
    # fine-tuning passes its own objective and row length
    config = dataclasses.replace(config, task="classify", seq_len=32)
    with pytest.raises(UsageError, match="not the bert model"):
        pretrain.make_run_mesh(config, zoo.config("tiny-bert"), objective=finetune.OBJECTIVE["classify"], seq_len=32)
    assert not (tmp_path / "run").exists()


def test_cli_refusal_is_one_line_exit_2_nothing_written(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--model", "tiny-mistral", "--data",
                           "synthetic", "--mesh", "sequence=2,fsdp=-1", "--seq-len", "32", "--context-parallel",
                           "ring", "--out", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("train.py")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "ring context parallelism needs sliding_window - 1 <= seq_len / (2 x context)" in lines[0], lines
    assert "use --context-parallel allgather" in lines[0]
    assert not out.exists()


def test_main_refusal_in_process(context2, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(pretrain, "make_trainer", _no_compile)
    assert train.main(["--model", "tiny-bert", "--mesh", "context=2,fsdp=-1", "--data", "synthetic",
                       "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train.py: error:") and "not the bert model" in err[0], err
