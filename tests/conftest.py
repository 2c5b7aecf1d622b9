"""Test-session setup shared by every test file.

The environment must be set before jax is first imported (test modules import
it after this file is loaded and configured):
    * 8 fake CPU devices, so sharding tests can build real meshes on one host;
    * JAX_PLATFORMS=cpu unless the caller chose, or selected the `gpu`-marked
        tests (`pytest -m gpu`, which need the real GPU backend): libtpu is
        installed for AOT topology compiles, and would otherwise probe for TPU
        hardware at start-up. TPU topology descriptions still work under "cpu";
    * ALLOW_MULTIPLE_LIBTPU_LOAD=1: libtpu otherwise takes a host-wide lock file,
        so two test processes compiling for TPU topologies at once would fail;
    * a per-session persistent compilation cache (see below).
"""

import atexit
import importlib.util
import os
import re
import shutil
import tempfile

import pytest

_FAKE_DEVICES = "--xla_force_host_platform_device_count=8"
if _FAKE_DEVICES.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FAKE_DEVICES}".strip()
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# A compilation cache for this session (and the train.py subprocesses it starts, which
# inherit the variable): tests that compile the same train step several times (resume,
# kill-and-restart) compile it once. A fresh directory per session: nothing stale.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="zoo-test-jax-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


def pytest_configure(config):
    markexpr = config.getoption("markexpr", "") or ""
    wants_gpu = "gpu" in markexpr and "not gpu" not in markexpr
    if not wants_gpu:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")


# A test file whose module-level imports need PyTorch (directly, or through the tiny-checkpoint
# builders of hf_utils): all its tests are marked `torch`.
_TORCH_IMPORT = re.compile(r"^(import|from) (torch|transformers)\b", re.MULTILINE)


def pytest_ignore_collect(collection_path, config):
    """Leaves torch-only files out where torch is missing and `-m "not torch"` deselects
    them anyway (the JAX-only CI leg). Without that marker expression a missing torch is
    an import error, never a silent skip."""
    if collection_path.suffix != ".py" or importlib.util.find_spec("torch") is not None:
        return None
    if not _TORCH_IMPORT.search(collection_path.read_text()):
        return None
    markexpr = config.getoption("markexpr", "") or ""
    return True if "not torch" in markexpr else None


@pytest.fixture
def no_compile(monkeypatch):
    """Fails the test if train.py gets as far as compiling its step (bad input must stop it first)."""
    from zoo.training import finetune, plan, pretrain  # after the environment above is set

    def fail(*a, **k):
        raise AssertionError("compiled despite bad input")

    for module in (pretrain, finetune, plan):
        monkeypatch.setattr(module, "make_trainer", fail)


def _memory_maps() -> int | None:
    try:
        with open("/proc/self/maps") as f:
            return sum(1 for _ in f)
    except OSError:  # not Linux
        return None


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
    """Drops jax's in-memory compilation caches after every test module.

    Each XLA:CPU executable keeps a few memory mappings alive (~3 for a tiny jitted function, many
    more for a train step) until jax's caches let go of it. One pytest process compiles thousands
    of programs, and on Linux a process has at most vm.max_map_count (65530) mappings: past that,
    mmap fails inside XLA and the process dies with SIGSEGV (CI's 3.11 leg did, three times, in
    `compile` or `serialize`, at a point of the suite that moved as tests were added, never alone).
    Tests keep their own references; the persistent compilation cache makes recompiles cheap.
    """
    yield
    import sys

    if "jax" in sys.modules:
        sys.modules["jax"].clear_caches()


def pytest_terminal_summary(terminalreporter):
    maps = _memory_maps()
    if maps is not None:
        terminalreporter.write_line(f"memory mappings of the pytest process at the end: {maps} "
                                    "(Linux allows 65530 by default; see _release_compiled_code)")
