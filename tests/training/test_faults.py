"""Faults and scale: two processes equal one, kill -9 and SIGTERM lose nothing, non-finite
steps are skipped and counted, and bad input gets one clear line before any compile."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train
import zoo
from zoo import data, objectives, registry
from zoo.sharding import make_mesh
from zoo.training import distributed, pretrain
from zoo.training.optimizer import OptimConfig
from zoo.training.step import init_state, make_trainer, mesh_context

from run_utils import saved_params, snapshot

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# eps well above float32 rounding noise: Adam's first steps are ~sign(g), which would
# turn reduction-order differences (gloo vs in-process all-reduce) into O(lr) changes.
RUN = ["--model", "tiny-llama", "--data", "synthetic", "--seq-len", "32", "--batch-size", "8", "--eps", "1e-3",
       "--lr", "1e-2", "--warmup-steps", "2", "--sample-tokens", "0", "--no-progress"]


def _env(devices: int = 8) -> dict:
    """A training subprocess's environment: CPU devices (and conftest's compilation cache)."""
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
                XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def _losses(out) -> dict[int, float]:
    """step -> loss from metrics.jsonl (the last record of a step wins, as after a resume)."""
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def _assert_params_equal(a, b):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------- multi-host


def _two_processes(out, steps: int):
    port = _free_port()
    procs = [subprocess.Popen(
        [sys.executable, "train.py", *RUN, "--mesh", "data=2,fsdp=4", "--steps", str(steps), "--decay-steps", "6",
         "--checkpoint-every", "2", "--out", str(out), "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
         "--process-id", str(i)],
        cwd=ROOT, env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:
            p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    return logs


def test_two_processes_with_checkpoint_and_restore_equal_one_process(tmp_path):
    # 2 processes x 4 CPU devices (jax.distributed over 127.0.0.1): 4 steps, a checkpoint,
    # then a restart that restores it and runs to 6.
    logs = _two_processes(tmp_path / "multi", steps=4)
    assert "2 process(es)" in logs[0]
    assert sorted(os.listdir(tmp_path / "multi" / "checkpoints")) == ["2", "4"]
    logs = _two_processes(tmp_path / "multi", steps=6)
    assert "resuming" in logs[0] and "from its checkpoint at step 4" in logs[0]
    # The same run in one process with 8 devices.
    summary = train.main([*RUN, "--mesh", "data=2,fsdp=4", "--steps", "6", "--decay-steps", "6",
                          "--checkpoint-every", "2", "--out", str(tmp_path / "single")])
    assert isinstance(summary, dict)
    multi, single = _losses(tmp_path / "multi"), _losses(tmp_path / "single")
    assert sorted(multi) == sorted(single) == list(range(1, 7))
    np.testing.assert_allclose([multi[s] for s in range(1, 7)], [single[s] for s in range(1, 7)], rtol=1e-5)
    a, b = saved_params(tmp_path / "multi", 6), saved_params(tmp_path / "single", 6)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_synthetic_global_batch_is_the_same_for_any_process_count():
    one = next(data.SyntheticIterator(vocab_size=100, seq_len=8, batch_size=4, seed=3))["input_ids"]
    halves = [next(data.SyntheticIterator(vocab_size=100, seq_len=8, batch_size=2, seed=3, process_index=i))
              ["input_ids"] for i in range(2)]
    np.testing.assert_array_equal(one, np.concatenate(halves))
    assert len(np.unique(one, axis=0)) == 4  # rows differ


# ------------------------------------------------------------------------ preemption / kill

STEPS = 12
FAULT = [*RUN, "--steps", str(STEPS), "--checkpoint-every", "1", "--keep-checkpoints", "2"]


@pytest.fixture(scope="module")
def reference_params(tmp_path_factory):
    """Final params of an uninterrupted run (in this process: same 8 CPU devices)."""
    out = tmp_path_factory.mktemp("reference")
    assert isinstance(train.main([*FAULT, "--out", str(out)]), dict)
    return saved_params(out, STEPS)


def _start(out):
    return subprocess.Popen([sys.executable, "train.py", *FAULT, "--out", str(out)], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_step(proc, out, step: int, timeout: float = 120.0):
    """Blocks until metrics.jsonl has `step` records (or the process ends)."""
    path = os.path.join(out, "metrics.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(path):
            with open(path) as f:
                if sum(1 for _ in f) >= step:
                    return
        time.sleep(0.002)
    raise AssertionError(f"run did not reach step {step}: {proc.communicate()[0][-2000:]}")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kill_9_at_a_random_step_then_resume_is_bitwise_identical(seed, tmp_path, reference_params):
    out = tmp_path / "run"
    kill_after = int(np.random.default_rng(seed).integers(1, STEPS - 3))
    proc = _start(out)
    _wait_for_step(proc, out, kill_after)
    time.sleep(float(np.random.default_rng(seed + 10).uniform(0, 0.05)))  # anywhere, also inside a save
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    steps_saved = sorted(int(d) for d in os.listdir(out / "checkpoints") if d.isdigit())
    assert steps_saved and steps_saved[-1] < STEPS  # it really stopped early
    restart = subprocess.run([sys.executable, "train.py", *FAULT, "--out", str(out)], cwd=ROOT, env=_env(),
                             capture_output=True, text=True, timeout=240)
    assert restart.returncode == 0, restart.stdout[-2000:] + restart.stderr[-2000:]
    assert "resuming" in restart.stdout
    _assert_params_equal(saved_params(out, STEPS), reference_params)
    # The log restarts at the checkpoint: every step once, none of the killed run's extra steps.
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == list(range(1, STEPS + 1))
    assert not [d for d in os.listdir(out / "checkpoints") if "tmp" in d]


@pytest.mark.parametrize("sig, status, name", [(signal.SIGTERM, 0, "SIGTERM"), (signal.SIGINT, 130, "Ctrl-C")])
def test_sigterm_and_ctrl_c_save_stop_and_resume_bitwise(sig, status, name, tmp_path, reference_params):
    out = tmp_path / "run"
    proc = _start(out)
    _wait_for_step(proc, out, 3)
    proc.send_signal(sig)
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode == status, log[-2000:]
    assert "Traceback" not in log
    assert f"{name}: checkpoint saved at step" in log
    stopped_at = int(log.split(f"{name}: checkpoint saved at step ")[1].split(";")[0])
    assert 3 <= stopped_at < STEPS
    assert os.path.isdir(out / "checkpoints" / str(stopped_at))
    # A save that a kill interrupted leaves a temporary dir: the next start removes it.
    stale = out / "checkpoints" / f"{STEPS - 1}.orbax-checkpoint-tmp-1234"
    stale.mkdir()
    restart = subprocess.run([sys.executable, "train.py", *FAULT, "--out", str(out)], cwd=ROOT, env=_env(),
                             capture_output=True, text=True, timeout=240)
    assert restart.returncode == 0, restart.stderr[-2000:]
    assert f"from its checkpoint at step {stopped_at}" in restart.stdout
    assert "removed 1 incomplete checkpoint save" in restart.stdout and not stale.exists()
    assert "Metadata file does not exist" not in restart.stderr  # absl noise on every resume, gone
    _assert_params_equal(saved_params(out, STEPS), reference_params)


def test_a_second_ctrl_c_aborts_at_once(monkeypatch, capsys):
    exits = []
    monkeypatch.setattr(distributed.os, "_exit", exits.append)
    before = signal.getsignal(signal.SIGINT)  # default_int_handler; SIG_IGN under `nohup ... &`
    stop = distributed.StopRequest()
    try:
        os.kill(os.getpid(), signal.SIGINT)  # the first: finish the step, save, stop
        assert stop.requested() == "sigint" and exits == []
        os.kill(os.getpid(), signal.SIGINT)  # the second: out at once, no save
        assert exits == [130]
    finally:
        stop.close()
    err = capsys.readouterr().err
    assert "Ctrl-C again to abort at once" in err and "second Ctrl-C: aborted without saving" in err
    assert signal.getsignal(signal.SIGINT) is before  # restored after the run


# --------------------------------------------------------------------------- non-finite

POISON = 511  # a batch whose first token is this id makes the test objective's loss NaN


def _poisonable_loss(model, params, batch, rng, *, z_loss=0.0):
    total, aux = objectives.causal_lm_loss(model, params, batch, rng, z_loss=z_loss)
    return total + jnp.where(batch["input_ids"][0, 0] == POISON, jnp.nan, 0.0), aux


@pytest.fixture
def poison_objective(monkeypatch):
    clm = objectives.get("clm")
    obj = objectives.Objective(name="clm-poison", fields=clm.fields, loss_fn=_poisonable_loss)
    monkeypatch.setitem(objectives.OBJECTIVES, obj.name, obj)
    llama = registry.FAMILIES["llama"]  # the families that train with clm train with it too
    monkeypatch.setitem(registry.FAMILIES, "llama",
                        dataclasses.replace(llama, objectives=(*llama.objectives, obj.name)))
    return obj.name


def test_nonfinite_step_leaves_state_unchanged(poison_objective):
    cfg = zoo.config("tiny-llama", dtype="float32", param_dtype="float32")
    mesh = make_mesh("data=1", devices=jax.devices()[:1])
    tr = make_trainer(cfg, mesh, OptimConfig(lr=1e-2, warmup_steps=0), objective=poison_objective,
                      batch_size=4, seq_len=16)
    it = data.SyntheticIterator(vocab_size=cfg.vocab_size, seq_len=16, batch_size=4, seed=0)
    with mesh_context(mesh):
        state = init_state(tr, mesh, seed=0)
        state, m = tr.step(state, next(it))
        assert float(m["nonfinite"]) == 0.0
        before = jax.device_get(state)
        bad = next(it)
        bad["input_ids"][0, 0] = POISON
        state, m = tr.step(state, bad)
        after = jax.device_get(state)
        assert float(m["nonfinite"]) == 1.0 and not np.isfinite(float(m["loss"]))
        _assert_params_equal(after["params"], before["params"])
        _assert_params_equal(after["opt_state"], before["opt_state"])
        assert int(after["step"]) == int(before["step"]) + 1
        state, m = tr.step(state, next(it))  # and training goes on
        assert float(m["nonfinite"]) == 0.0 and np.isfinite(float(m["loss"]))
        changed = jax.device_get(state["params"])["embed_tokens"]["embedding"]
        assert not np.array_equal(changed, after["params"]["embed_tokens"]["embedding"])


def test_injected_nan_batch_is_skipped_and_counted(poison_objective, tmp_path, monkeypatch):
    real_next = data.SyntheticIterator.__next__

    def poisoned_next(self):
        batch = real_next(self)
        if self.step == 3:  # the third batch
            batch["input_ids"][0, 0] = POISON
        return batch

    monkeypatch.setattr(data.SyntheticIterator, "__next__", poisoned_next)
    out = tmp_path / "run"
    summary = train.main([*RUN, "--objective", poison_objective, "--steps", "5", "--out", str(out),
                          "--vocab-size", "512"])
    assert isinstance(summary, dict) and summary["stopped"] is None
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["nonfinite"] for r in records] == [0, 0, 1, 0, 0]
    assert all(np.isfinite(r["loss"]) for i, r in enumerate(records) if i != 2)


@pytest.mark.parametrize("limit", [1, 3])
def test_k_nonfinite_steps_in_a_row_stop_with_last_good_checkpoint(limit, poison_objective, tmp_path, monkeypatch,
                                                                   capsys):
    real_next = data.SyntheticIterator.__next__

    def poisoned_next(self):
        batch = real_next(self)
        if self.step >= 3:  # every batch from the third on
            batch["input_ids"][0, 0] = POISON
        return batch

    monkeypatch.setattr(data.SyntheticIterator, "__next__", poisoned_next)
    out = tmp_path / "run"
    status = train.main([*RUN, "--objective", poison_objective, "--steps", "20", "--out", str(out),
                         "--vocab-size", "512", "--max-nonfinite", str(limit), "--checkpoint-every", "100"])
    assert status == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{limit} steps in a row had a non-finite loss" in err[0], err
    # Exactly `limit` bad steps ran (steps 3..2+limit), no more: the stop is at step 2 + limit.
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["nonfinite"] for r in records] == [0, 0] + [1] * limit
    saved = sorted(int(d) for d in os.listdir(out / "checkpoints") if d.isdigit())
    assert saved == [2 + limit]
    # The checkpoint holds the params after step 2, the last good one: rerun 2 clean steps.
    monkeypatch.setattr(data.SyntheticIterator, "__next__", real_next)
    clean = tmp_path / "clean"
    train.main([*RUN, "--objective", poison_objective, "--steps", "2", "--out", str(clean),
                "--vocab-size", "512", "--decay-steps", "20"])
    _assert_params_equal(saved_params(out, saved[0]), saved_params(clean, 2))


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("name, content, message", [
    ("empty.txt", b"", "empty data file"),
    ("latin1.txt", "caf\u00e9 au lait\n".encode("latin-1"), "not UTF-8 text (bad byte 0xe9 at byte offset 3)"),
    ("bad.jsonl", b'{"text": "ok"}\n{"text": 3}\n', "bad.jsonl:2: a JSON record needs a string 'text' field"),
    ("broken.jsonl", b'{"text": "ok"}\n{"text": \n', "broken.jsonl:2: not a JSON record"),
])
def test_bad_data_files_fail_with_one_line(name, content, message, tmp_path, capsys, no_compile):
    (tmp_path / "good.txt").write_text("some good text\n" * 20)
    (tmp_path / name).write_bytes(content)
    out = tmp_path / "out"
    out.mkdir()
    (out / "args.json").write_text("{}")
    before = snapshot(out)
    assert train.main(["--data", str(tmp_path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and name in err[0], err
    assert snapshot(out) == before


def test_checkpoint_of_another_model_is_refused_before_compiling(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert isinstance(train.main([*RUN, "--steps", "2", "--out", str(out)]), dict)
    before = snapshot(out)

    def fail(*a, **k):
        raise AssertionError("compiled despite a mismatched checkpoint")

    monkeypatch.setattr(pretrain, "make_trainer", fail)
    capsys.readouterr()
    other = [a if a != "tiny-llama" else "tiny-gpt2" for a in RUN]
    assert train.main([*other, "--steps", "4", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is of another model" in err[0] and "use another --out" in err[0], err
    assert snapshot(out) == before  # nothing written, nothing overwritten


@pytest.mark.parametrize("argv, message", [
    (["--coordinator", "127.0.0.1:1234"], "go together"),
    (["--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "2"], "is not below"),
])
def test_bad_distributed_flags(argv, message, capsys, no_compile):
    assert train.main(argv) == 2
    assert message in capsys.readouterr().err


def test_checkpoint_of_another_process_count_is_refused_before_compiling(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert isinstance(train.main([*RUN, "--steps", "2", "--out", str(out)]), dict)
    data_dir = out / "checkpoints" / "2" / "data"
    (record,) = [p for p in data_dir.iterdir() if p.suffix != ".txt" and not p.name.startswith("_")]
    saved = json.loads(record.read_text())
    assert saved["process_count"] == 1 and len(saved["processes"]) == 1
    record.write_text(json.dumps({"process_count": 2, "processes": saved["processes"] * 2}))
    monkeypatch.setattr(pretrain, "make_trainer", lambda *a, **k: pytest.fail("compiled despite the mismatch"))
    capsys.readouterr()
    assert train.main([*RUN, "--steps", "4", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "written by 2 processes" in err[0], err
