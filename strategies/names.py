"""The strategies' names and the VLM table's letters, in one place both the settings and the registry read.

Kept apart from ``registry`` so that checking a config's ``strategy.name`` needs no model code.
"""

from __future__ import annotations

from strategies.errors import StrategyConfigError
from strategies.settings import did_you_mean

NAMES = ("full", "feature_extraction", "top_k", "progressive", "importance_top_k",
         "connector_only", "connector_llm_lora", "all_lora", "vision_frozen_llm_full")
LETTERS = {"A": "connector_only", "B": "connector_llm_lora", "C": "all_lora", "D": "vision_frozen_llm_full",
           "E": "full"}  # SPEC's VLM strategies A-E


def canonical_name(name: str, where: str = "strategy") -> str:
    """A strategy name or its letter (case-insensitive) -> the name; an unknown one says what is close."""
    key = LETTERS.get(str(name).upper(), name) if len(str(name)) == 1 else name
    if key not in NAMES:
        raise StrategyConfigError(
            f"{where}.name = {name!r}: unknown strategy{did_you_mean(name, NAMES)}. Known: {', '.join(NAMES)} "
            f"(VLM ids: {', '.join(f'{k}={v}' for k, v in sorted(LETTERS.items()))})."
        )
    return key
