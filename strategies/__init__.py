"""Freeze strategies: which parts of a transformers model train, and at which learning rate.

Pure PyTorch + transformers + peft; no Ray, no MLflow (those live in ``pipelines``).
"""

from .config import StrategyConfig, StrategyConfigError
from .memory import estimate_memory, human_bytes
from .parts import PART_NAMES, ModelParts, ModelStructureError, PartsOverride, find_parts, unwrap
from .plan import Plan, build_plan
from .registry import STRATEGIES, Strategy, get_strategy, settings_used
from .schedules import ScheduleConfig, build_scheduler, lr_multiplier

__all__ = [
    "PART_NAMES", "STRATEGIES", "ModelParts", "ModelStructureError", "PartsOverride", "Plan",
    "ScheduleConfig", "Strategy", "StrategyConfig", "StrategyConfigError", "build_plan", "build_scheduler",
    "estimate_memory", "find_parts", "get_strategy", "human_bytes", "settings_used", "lr_multiplier", "unwrap",
]
