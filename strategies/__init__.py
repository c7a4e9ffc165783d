"""Freeze strategies: which parts of a transformers model train, and at which learning rate.

Pure PyTorch + transformers + peft; no Ray, no MLflow (those live in ``pipelines``). The names below are
imported on first use, so the settings (``strategies.config``) load without torch: configs are checked
and ``freezetune --help`` answers before any model code is imported.
"""

import importlib

_WHERE = {
    "StrategyConfig": "config", "PartsOverride": "config",
    "StrategyConfigError": "errors", "ModelStructureError": "errors",
    "estimate_memory": "memory", "human_bytes": "memory",
    "PART_NAMES": "parts", "ModelParts": "parts", "find_parts": "parts", "unwrap": "parts",
    "Plan": "plan", "build_plan": "plan",
    "STRATEGIES": "registry", "Strategy": "registry", "get_strategy": "registry", "settings_used": "registry",
    "ScheduleConfig": "schedules", "build_scheduler": "schedules", "lr_multiplier": "schedules",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'strategies' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"strategies.{_WHERE[name]}"), name)
    globals()[name] = value
    return value
