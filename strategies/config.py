"""The strategy settings of one run: what trains, at which learning rates.

Each field carries its help text (``metadata["help"]``); ``validate`` checks
everything that can be checked without the model, and ``check_against`` what
needs the model's parts. Errors name the field and the fix.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from strategies.errors import ModelStructureError, StrategyConfigError
from strategies.names import canonical_name
from strategies.settings import from_dict, help_of
from strategies.settings import setting as _f
from strategies.settings import unknown_keys_error

IMPORTANCE_MEASURES = ("ablation", "influence", "grad_norm", "fisher")  # pipelines/importance.py computes them


@dataclass
class PartsOverride:
    """Module paths (relative to the unwrapped transformers model) that replace detection.

    Any field left empty is still detected from structure.
    """

    language: str | None = None  # root of the language stack, e.g. "model.language_model"
    language_blocks: str | None = None  # its ModuleList of blocks, e.g. "model.language_model.layers"
    vision: str | None = None  # root of the vision stack, e.g. "model.vision_tower"
    vision_blocks: str | None = None  # its ModuleList of blocks
    connector: list[str] = field(default_factory=list)  # modules that form the connector
    head: list[str] = field(default_factory=list)  # modules that form the task head

    @classmethod
    def from_dict(cls, data: dict | None) -> "PartsOverride":
        data = dict(data or {})
        unknown = [k for k in data if k not in cls.__dataclass_fields__]
        if unknown:
            raise unknown_keys_error("parts override", unknown, cls.__dataclass_fields__, ModelStructureError)
        for key in ("connector", "head"):
            if isinstance(data.get(key), str):
                data[key] = [data[key]]
        return cls(**data)

    def is_empty(self) -> bool:
        return not any(getattr(self, f) for f in self.__dataclass_fields__)


@dataclass
class StrategyConfig:
    name: str = _f("full", "strategy: full, feature_extraction, top_k, progressive, importance_top_k, "
                           "connector_only (A), connector_llm_lora (B), all_lora (C), vision_frozen_llm_full (D)")
    lr: float = _f(2e-5, "base learning rate: text models, and any part LR left unset")
    vision_lr: float | None = _f(None, "learning rate of the vision encoder (and of a video or audio encoder; "
                                       "default: lr)")
    connector_lr: float | None = _f(None, "learning rate of the connector/projector (default: lr)")
    llm_lr: float | None = _f(None, "learning rate of the language model and head (default: lr)")
    layer_decay: float = _f(1.0, "discriminative LR: block l gets lr * decay**(L-1-l); in (0, 1], 1 = off")
    top_k: int = _f(2, "top_k: number of top language blocks to train")
    layers_per_epoch: int = _f(1, "progressive: blocks thawed per stage (ULMFiT: 1); a stage is an epoch unless "
                                  "thaw_every says otherwise")
    thaw_every: float | None = _f(None, "progressive: a thaw stage lasts this many optimizer steps (an integer >= 1) "
                                        "or this fraction of the run's steps (a number in (0, 1)); default: an epoch")
    weight_decay: float = _f(0.01, "AdamW weight decay on weights (never on biases and norm weights)")
    train_embeddings: bool | None = _f(None, "train the input embeddings too (default: only `full` and a fully thawed `progressive`)")
    lora_r: int = _f(16, "LoRA rank")
    lora_alpha: float = _f(32, "LoRA alpha (scale = alpha / r)")
    lora_dropout: float = _f(0.05, "LoRA dropout")
    lora_targets: str | list[str] = _f("attention", "LoRA on `attention` projections (q/k/v/o), `all` linear layers "
                                                     "of a block, or a list of layer names (e.g. [q_proj, v_proj])")
    importance: dict[str, float] | None = _f(None, "importance_top_k: block unit -> score (higher = more important)")
    importance_from: str | None = _f(None, "importance_top_k: where `importance` comes from: the MLflow run id of a "
                                           "`freezetune analyze` run, a ranking JSON file, or `auto` (measured on the "
                                           "base model before training)")
    importance_measure: str = _f("ablation", "importance_top_k: the measure that ranks blocks: ablation, influence, "
                                             "grad_norm or fisher")
    parts: dict[str, Any] | None = _f(None, "explicit module paths when the model's structure cannot be read")

    # ------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, where: str = "strategy") -> "StrategyConfig":
        return from_dict(cls, dict(data or {}), where, StrategyConfigError)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def help() -> dict[str, str]:
        return help_of(StrategyConfig)

    # LRs per part, with defaults resolved
    @property
    def part_lrs(self) -> dict[str, float]:
        return {
            "vision": self.vision_lr if self.vision_lr is not None else self.lr,
            "connector": self.connector_lr if self.connector_lr is not None else self.lr,
            "language": self.llm_lr if self.llm_lr is not None else self.lr,
            "other": self.lr,
        }

    def validate(self, where: str = "strategy") -> None:
        self.name = canonical_name(self.name, where)
        for key in ("lr", "vision_lr", "connector_lr", "llm_lr"):
            value = getattr(self, key)
            if value is None and key != "lr":
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
                raise StrategyConfigError(f"{where}.{key} = {value!r}: a learning rate must be a number > 0 (e.g. 2e-5).")
        if not isinstance(self.layer_decay, (int, float)) or not (0 < self.layer_decay <= 1):
            raise StrategyConfigError(
                f"{where}.layer_decay = {self.layer_decay!r}: must be in (0, 1] (1 = same LR for every block; "
                "typical 0.8-0.95, ULMFiT used 1/2.6 ~ 0.385)."
            )
        for key in ("top_k", "layers_per_epoch", "lora_r"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise StrategyConfigError(f"{where}.{key} = {value!r}: must be an integer >= 1.")
        thaw = self.thaw_every
        if thaw is not None and (not isinstance(thaw, (int, float)) or isinstance(thaw, bool) or not math.isfinite(thaw)
                                 or thaw <= 0 or (thaw >= 1 and thaw != int(thaw))):
            raise StrategyConfigError(f"{where}.thaw_every = {thaw!r}: use optimizer steps per stage (an integer >= 1, "
                                      "e.g. 500) or a fraction of the run (in (0, 1), e.g. 0.1); leave it unset for "
                                      "one stage per epoch.")
        if not isinstance(self.weight_decay, (int, float)) or self.weight_decay < 0:
            raise StrategyConfigError(f"{where}.weight_decay = {self.weight_decay!r}: must be >= 0 (default 0.01).")
        if not (0 <= self.lora_dropout < 1):
            raise StrategyConfigError(f"{where}.lora_dropout = {self.lora_dropout!r}: must be in [0, 1).")
        if self.lora_alpha <= 0:
            raise StrategyConfigError(f"{where}.lora_alpha = {self.lora_alpha!r}: must be > 0 (common: 2 * lora_r).")
        targets = self.lora_targets
        if not (targets in ("attention", "all") or (isinstance(targets, list) and targets
                                                     and all(isinstance(t, str) and t for t in targets))):
            raise StrategyConfigError(
                f"{where}.lora_targets = {targets!r}: use `attention`, `all` or a non-empty list of layer names."
            )
        if self.importance_measure not in IMPORTANCE_MEASURES:
            raise StrategyConfigError(f"{where}.importance_measure = {self.importance_measure!r}: use one of "
                                      f"{', '.join(IMPORTANCE_MEASURES)}.")
        if self.parts is not None:
            PartsOverride.from_dict(self.parts)
