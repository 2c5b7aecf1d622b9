"""Helpers for tests of commands that must refuse bad input without touching anything."""

from __future__ import annotations

import os

import pytest

from zoo.training import finetune, plan, pretrain


def snapshot(directory) -> dict[str, bytes]:
    """Every file under `directory` (relative path -> bytes): compare before and after a refusal."""
    return {os.path.relpath(os.path.join(d, f), directory): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(directory) for f in files}


@pytest.fixture
def no_compile(monkeypatch):
    """Fails the test if train.py gets as far as compiling its step (bad input must stop it first)."""
    def fail(*a, **k):
        raise AssertionError("compiled despite bad input")

    for module in (pretrain, finetune, plan):
        monkeypatch.setattr(module, "make_trainer", fail)
