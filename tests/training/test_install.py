"""A normal (non-editable) install works outside the repository: `pip install .` into a fresh
venv, then from another directory `python -m zoo --help`, `python -m benchmarks.plan --help`
(both from the installed copy) and fine-tuning through `python <repo>/train.py --task classify`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A fresh venv with the zoo installed by `pip install .` (no editable link). Its dependencies (and pip)
    come from this interpreter's site-packages through a .pth line; the .pth files there (this checkout's
    editable install) are not processed, so `import zoo` can only find the installed copy."""
    root = tmp_path_factory.mktemp("install")
    env_dir = root / "venv"
    venv.create(env_dir, with_pip=False)
    site_dir = next((env_dir / "lib").glob("python3*/site-packages"))
    deps = [p for p in sys.path if p.endswith("site-packages") and os.path.isdir(p)]
    (site_dir / "zoo_test_deps.pth").write_text("\n".join(deps) + "\n")
    python = str(env_dir / "bin" / "python")
    build = subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", ROOT],
                           capture_output=True, text=True, cwd=root, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    return python, root


def _run(python, *args, cwd, timeout=600):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH="")
    env.pop("XLA_FLAGS", None)
    return subprocess.run([python, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def test_installed_package_runs_from_another_directory(installed):
    python, root = installed
    where = _run(python, "-c", "import zoo, zoo.training, benchmarks; print(zoo.__file__); "
                 "print(benchmarks.__file__)", cwd=root)
    assert where.returncode == 0, where.stderr[-2000:]
    for line in where.stdout.split():
        assert str(root / "venv") in line, where.stdout  # the installed copy, not the checkout
    for module in ("zoo", "benchmarks.plan"):
        proc = _run(python, "-m", module, "--help", cwd=root)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "usage:" in proc.stdout


def test_finetuning_through_train_py_from_another_directory(installed):
    from tokenizers import Tokenizer, models, pre_tokenizers

    python, root = installed
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "movie", "the"]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(root / "tok.json"))
    (root / "train.jsonl").write_text("".join(json.dumps({"text": f"the movie {w}", "label": int(w == "good")}) + "\n"
                                              for w in ("good", "bad") * 8))
    proc = _run(python, os.path.join(ROOT, "train.py"), "--task", "classify", "--model", "tiny-bert-cls",
                "--tokenizer", "tok.json", "--data", "train.jsonl", "--epochs", "1", "--batch-size", "8",
                "--out", "ft", "--no-progress", cwd=root)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    records = [json.loads(line) for line in open(root / "ft" / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2] and "train_loss" in records[-1]
