"""README's own commands, run as written (relative paths and all) on tiny stand-ins.

Every shell command in the Quickstart and "Using a model" sections is extracted from
README.md. Each one is either run here, once from the directory the README assumes and
once from another working directory (its relative paths rewritten to reach the same
files), or listed in NOT_RUN with the reason; a new README command that is neither makes
the test fail, so the README cannot drift from what works.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = ("## Quickstart", "## Using a model")
# Appended to README's `python train.py` (argparse: the last value wins): the same command
# on a tiny model and corpus, so the run directory it makes is cheap.
TINY_TRAIN = ["--model", "tiny-llama", "--data", "corpus.txt", "--steps", "2", "--seq-len", "32", "--batch-size", "8",
              "--sample-tokens", "8", "--no-progress"]
NOT_RUN = {
    "python -m pytest": "the test suite itself",
    "python -m zoo eval --model runs/t5-ft --data dev.jsonl": "needs the fine-tuned T5 run of the fine-tuning section "
                                                              "(test_finetune.py covers eval on one)",
    "python -m zoo eval --model runs/classify --data dev.jsonl": "needs the fine-tuned classifier of the fine-tuning "
                                                                "section (test_finetune.py covers eval on one)",
}


def readme_commands() -> list[list[str]]:
    """The shell commands (argv lists) of README's Quickstart and "Using a model" sections."""
    text = open(os.path.join(ROOT, "README.md")).read()
    commands = []
    for title in SECTIONS:
        start = text.index(title)
        end = text.find("\n## ", start + len(title))
        section = text[start:end if end > 0 else None]
        for block in re.findall(r"```bash\n(.*?)```", section, re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = re.sub(r"\[(--[\w-]+)\]", r"\1", line)  # optional flags in brackets: take them
                for part in line.split("&&"):
                    argv = shlex.split(part, comments=True)
                    if argv and argv[0] == "python":
                        commands.append(argv)
    return commands


def _key(argv) -> str:
    return " ".join(shlex.quote(a) for a in argv)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """What the README's commands expect to find: a run dir made by the quickstart command
    itself (on a tiny preset), an HF GPT-2 dir with a tokenizer, held-out text."""
    import jax
    import numpy as np

    import zoo
    from zoo import data

    ws = tmp_path_factory.mktemp("readme")
    (ws / "corpus.txt").write_text("def add(a, b):\n    return a + b\n\n" * 300)
    (ws / "held_out.txt").write_text("def sub(a, b):\n    return a - b\n")
    quickstart = [argv for argv in readme_commands() if argv[:2] == ["python", "train.py"]]
    assert quickstart == [["python", "train.py"]], quickstart
    run = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *TINY_TRAIN], cwd=ws, env=_env(),
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (ws / "runs" / "default" / "checkpoints").is_dir()
    tok = data.train_tokenizer(["Hello, the sky is blue and the sea is green.\n" * 50], ws / "tok.model",
                               vocab_size=300)
    cfg = zoo.config("tiny-gpt2")
    model = zoo.build(cfg)
    params = model.init(jax.random.PRNGKey(0), np.zeros((1, 8), np.int32))["params"]
    zoo.to_hf(model, params, ws / "gpt2-hf", tokenizer=tok)
    (ws / "tok.model").unlink()
    return ws


def _env() -> dict:
    return dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu")


def _relocate(argv, ws, cwd) -> list[str]:
    """argv with each argument that names something in the workspace (or is an output beside
    such a thing) rewritten relative to `cwd`, as a user in that directory would type it."""
    out = []
    for arg in argv:
        head = arg.rstrip("/").split("/")[0]
        if arg and not arg.startswith("-") and ((ws / head).exists() or head in ("runs", "exported-hf")):
            arg = os.path.relpath(ws / arg, cwd) + ("/" if arg.endswith("/") else "")
        out.append(arg)
    return out


def _runs_here(argv) -> bool:
    return argv[1] == "train.py" or argv[1:3] == ["-m", "zoo"]


def test_every_readme_command_is_run_or_listed():
    commands = readme_commands()
    assert any(argv[1:3] == ["-m", "zoo"] for argv in commands) and ["python", "train.py"] in commands
    unaccounted = [_key(a) for a in commands if _key(a) not in NOT_RUN and not _runs_here(a)]
    assert not unaccounted, f"README commands neither run by this file nor listed in NOT_RUN: {unaccounted}"
    stale = set(NOT_RUN) - {_key(a) for a in commands}
    assert not stale, f"NOT_RUN names commands the README no longer has: {stale}"


@pytest.mark.main_leg
@pytest.mark.parametrize("where", ["readme_dir", "other_dir"])
def test_readme_commands_run_with_relative_paths(where, workspace, tmp_path):
    ws = tmp_path / "ws"
    shutil.copytree(workspace, ws)
    cwd = ws if where == "readme_dir" else ws / "elsewhere" / "deeper"
    cwd.mkdir(parents=True, exist_ok=True)
    ran = []
    for argv in readme_commands():
        if _key(argv) in NOT_RUN or argv[:2] == ["python", "train.py"]:
            continue  # train.py's quickstart command built the workspace's run dir
        argv = _relocate(argv, ws, cwd)
        proc = subprocess.run([sys.executable, *argv[1:]], cwd=cwd, env=_env(), capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, f"{_key(argv)} (cwd {cwd}):\n{proc.stderr[-3000:]}"
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
        command = argv[3]  # python -m zoo COMMAND ...
        if command == "generate":
            assert "=== prompt 1/" in proc.stdout or proc.stdout.lstrip().startswith("{"), proc.stdout
        elif command == "eval":
            assert proc.stdout.startswith("perplexity "), proc.stdout
        elif command == "convert":
            out = cwd / argv[5]
            assert (out / ("config.json" if (out / "config.json").exists() else "zoo_config.json")).is_file()
        ran.append(command)
    assert sorted(set(ran)) == ["convert", "eval", "generate"]
