"""Every named preset, by name: each family's `PRESETS` (zoo/models/<family>/config.py), read
through the registry, so a new family's presets appear here without touching this file."""

from __future__ import annotations

from zoo import registry
from zoo.configs import ModelConfig


def _collect() -> dict[str, ModelConfig]:
    presets: dict[str, ModelConfig] = {}
    for family in registry.FAMILIES.values():
        for cfg in family.presets:
            if cfg.name in presets:
                raise ValueError(f"preset {cfg.name!r} is defined twice "
                                 f"({registry.of(presets[cfg.name]).name} and {family.name})")
            presets[cfg.name] = cfg
    return presets


PRESETS: dict[str, ModelConfig] = _collect()
