"""Session-wide work that the contract suite and the per-family files share, each piece done
once: the tiny HF checkpoints (one per tests/hf_utils.CHECKPOINTS entry), their zoo
import + export, one sharded train step per family and one short pretraining run per family.

Every fixture returns a function of a name, computing on first use and caching after, so a
test run that selects one family builds only that family's pieces.
"""

from __future__ import annotations

import json

import jax
import pytest

import zoo
from zoo import registry
from zoo.training.main import main as train_main

from step_utils import packed_batch, single_and_sharded_step


def tiny_preset(family: str) -> str:
    """The smallest preset of a family: `tiny-<family>` where it exists, else the first `tiny-*`."""
    names = sorted(n for n in zoo.list_models() if n.startswith("tiny-") and zoo.config(n).family == family)
    assert names, f"family {family!r} has no tiny-* preset"
    return f"tiny-{family}" if f"tiny-{family}" in names else names[0]


def _cached(make):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = make(name)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """name -> (torch model, checkpoint dir) for tests/hf_utils.CHECKPOINTS[name]; needs torch."""
    from hf_utils import make_model, save  # builds with torch: imported by the torch tests that use it

    def make(name):
        model = make_model(name)
        path = tmp_path_factory.mktemp("hf") / name
        save(model, path)
        return model, path

    return _cached(make)


@pytest.fixture(scope="session")
def hf_export(hf_checkpoint, tmp_path_factory):
    """name -> (model, params, export dir): the checkpoint imported by zoo.from_hf and written
    back by zoo.to_hf into <fresh dir>/export (nothing else is in that fresh dir)."""

    def make(name):
        model, params = zoo.from_hf(hf_checkpoint(name)[1])
        out = tmp_path_factory.mktemp("export") / "export"
        zoo.to_hf(model, params, out)
        return model, params, out

    return _cached(make)


def sharded_spec(cfg) -> tuple[str, int]:
    """An 8-device mesh that splits every kind of weight, and the micro-batches per step:
    experts split too where the model has them, over two micro-batches so that the
    auxiliary losses' accumulation is checked as well."""
    if getattr(cfg, "num_experts", 0):
        return "fsdp=2,expert=2,tensor=2", 2
    return "data=2,fsdp=2,tensor=2", 1


@pytest.fixture(scope="session")
def sharded_step():
    """family -> (cfg, single, sharded, start): one train step of the family's tiny preset with
    its pretraining objective on one device and on `sharded_spec` over 8, from the same
    state (see tests/step_utils.py)."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 fake CPU devices (tests/conftest.py)")

    def make(family):
        cfg = zoo.config(tiny_preset(family), dtype="float32", param_dtype="float32")
        objective = registry.FAMILIES[family].objectives[0]
        spec, grad_accum = sharded_spec(cfg)
        single, sharded, start = single_and_sharded_step(cfg, packed_batch(cfg.vocab_size), spec,
                                                         objective=objective, grad_accum=grad_accum)
        return cfg, single, sharded, start

    return _cached(make)


PRETRAIN_STEPS = 40


@pytest.fixture(scope="session")
def pretrain_run(tmp_path_factory):
    """family -> (summary, metrics.jsonl records): `train.py --model <tiny preset> --objective
    <pretraining default>` for PRETRAIN_STEPS steps on the embedded corpus (Python's stdlib)."""

    def make(family):
        out = tmp_path_factory.mktemp(f"pretrain-{family}")
        argv = ["--model", tiny_preset(family), "--objective", registry.FAMILIES[family].objectives[0],
                "--steps", str(PRETRAIN_STEPS), "--seq-len", "64", "--batch-size", "8", "--lr", "3e-3",
                "--data-max-bytes", "300000", "--out", str(out), "--no-progress", "--sample-tokens", "0",
                "--checkpoint-every", str(PRETRAIN_STEPS)]
        summary = train_main(argv)
        assert isinstance(summary, dict), summary
        with open(out / "metrics.jsonl") as f:
            records = [json.loads(line) for line in f]
        return summary, records

    return _cached(make)
