"""The data model of `freezetune compare`: trials, configurations over seeds, strategies, the comparison.

Plain dataclasses, filled by ``mlflow_reader`` (or by hand in tests), ordered by ``ranking``, judged by
``verdict`` and rendered by ``render``; nothing here reads MLflow or decides a rank.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Iterable

DEFAULT_METRIC = "eval_loss"
SCORED = ("finished", "stopped_early")  # outcomes that get a rank (in this order of tiers)
OUTCOME_ORDER = {"finished": 0, "stopped_early": 1, "running": 2, "killed": 3, "failed": 4}
LR_KEYS = ("strategy.lr", "strategy.vision_lr", "strategy.connector_lr", "strategy.llm_lr")

Importance = dict[str, dict[str, dict[str, float]]]  # phase (before/after/base) -> measure -> unit -> score


# --- values of params ------------------------------------------------------------------------


def number(value) -> float | None:
    """A param or tag (a string in MLflow) as a finite float; None when it is not one."""
    if value is None or isinstance(value, bool):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def as_int(value) -> int | None:
    return int(value) if value is not None else None


def param_value(value):
    """A param string as the number it is (ints as int), other text as is; None stays None."""
    if value is None or isinstance(value, (int, float)):
        return value
    parsed = number(value)
    if parsed is None:
        return value
    return int(parsed) if parsed.is_integer() and "e" not in str(value).lower() and "." not in str(value) else parsed


def short_key(key: str) -> str:
    """A strategy setting without its section: strategy.llm_lr -> llm_lr (column headers, labels)."""
    return key[len("strategy."):] if key.startswith("strategy.") else key


def count(items: Iterable[str]) -> dict[str, int]:
    """How often each item occurs, in order of first occurrence (outcome counts keep the trials' order)."""
    out: dict[str, int] = {}
    for item in items:
        out[item] = out.get(item, 0) + 1
    return out


# --- rows ------------------------------------------------------------------------------------


@dataclass
class Trial:
    """One trial (child run of a sweep) or one plain training run, as the comparison sees it."""

    run_id: str
    run_name: str
    trial_id: str
    sweep: str  # parent run name ("" for a plain run)
    sweep_run_id: str
    experiment_id: str
    strategy: str
    model: str
    outcome: str  # finished | stopped_early | running | killed | failed
    error: str
    seed: int | None
    params: dict[str, str]
    sampled: dict[str, Any]
    curve: list[tuple[int, float]]  # the metric per epoch (finite values only)
    best: float | None  # None: no finite value of the metric was logged
    best_epoch: int | None
    epochs_reached: int
    epochs_planned: int | None
    trainable_params: float | None
    trainable_share: float | None
    share_source: str  # "logged" | "estimated" | ""
    train_time_s: float | None  # sum of epoch_seconds: the training loop's own time
    wall_time_s: float | None  # MLflow run start → end (or now, while running)
    tokens_per_s: float | None  # mean over epochs
    peak_memory_mb: float | None  # max over epochs
    importance: Importance
    last_update: float | None  # epoch seconds of the newest metric
    rank: int | None = None
    config_id: int | None = None

    @property
    def scored(self) -> bool:
        return self.outcome in SCORED and self.best is not None

    @property
    def tier(self) -> int:
        """Sort tier: finished 0, stopped early 1; then unscored ones: no metric 2-3, running 4, killed 5, failed 6."""
        return OUTCOME_ORDER.get(self.outcome, 4) if self.scored else 2 + OUTCOME_ORDER.get(self.outcome, 4)

    def value(self, key: str):
        """A used param or a searched value, as a number where it is one."""
        return param_value(self.params.get(key, self.sampled.get(key)))

    def lr(self, key: str) -> float | None:
        return number(self.params.get(key))

    def to_dict(self, varied: Iterable[str] = ()) -> dict[str, Any]:
        return {
            "rank": self.rank, "trial_id": self.trial_id, "run_id": self.run_id, "run_name": self.run_name,
            "sweep": self.sweep, "sweep_run_id": self.sweep_run_id, "strategy": self.strategy, "model": self.model,
            "config_id": self.config_id, "seed": self.seed, "outcome": self.outcome, "error": self.error or None,
            "best": self.best, "best_epoch": self.best_epoch, "epochs_reached": self.epochs_reached,
            "epochs_planned": self.epochs_planned, "trainable_params": as_int(self.trainable_params),
            "trainable_share": self.trainable_share, "trainable_share_source": self.share_source or None,
            "train_time_s": self.train_time_s, "wall_time_s": self.wall_time_s, "tokens_per_s": self.tokens_per_s,
            "peak_memory_mb": self.peak_memory_mb,
            "varied": {k: self.value(k) for k in varied},
            "sampled": self.sampled, "curve": [[s, v] for s, v in self.curve],
            "importance": self.importance or None,
        }


@dataclass
class Configuration:
    """Trials with the same searched values (model, strategy, epochs) under different seeds."""

    key: str
    strategy: str
    model: str
    trials: list[Trial]
    id: int = 0
    rank: int | None = None
    gap_to_next: float | None = None  # how far ahead of the next ranked configuration (>= 0)
    spread_vs_next: float | None = None  # the larger seed std of this one and the next
    vs_next: str | None = None  # "clear" | "within spread" | "spread unknown"

    @property
    def scores(self) -> list[float]:
        return [t.best for t in self.trials if t.scored]

    @property
    def n(self) -> int:
        return len(self.scores)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.scores) if self.scores else None

    @property
    def std(self) -> float | None:
        """Sample std over seeds; None under one seed (the spread is unknown, not zero)."""
        return statistics.stdev(self.scores) if self.n >= 2 else None

    @property
    def tier(self) -> int:
        return min(t.tier for t in self.trials)

    @property
    def ranked(self) -> bool:
        return self.n > 0

    def values(self, varied: Iterable[str]) -> dict[str, Any]:
        return {k: self.trials[0].value(k) for k in varied}

    def to_dict(self, varied: Iterable[str] = ()) -> dict[str, Any]:
        return {"config_id": self.id, "rank": self.rank, "strategy": self.strategy, "model": self.model,
                "values": self.values(varied), "seeds": sorted(t.seed for t in self.trials if t.seed is not None),
                "n_scored": self.n, "mean": self.mean, "std": self.std,
                "min": min(self.scores) if self.scores else None, "max": max(self.scores) if self.scores else None,
                "outcomes": count(t.outcome for t in self.trials), "gap_to_next": self.gap_to_next,
                "spread_vs_next": self.spread_vs_next, "vs_next": self.vs_next,
                "trial_ids": [t.trial_id for t in self.trials]}


@dataclass
class StrategyGroup:
    """Every trial of one strategy: its best scored trial, the median of its scored trials, counts by outcome."""

    strategy: str
    trials: list[Trial]
    best_trial: Trial | None
    median: float | None
    outcomes: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        shares = [t.trainable_share for t in self.trials if t.trainable_share is not None]
        times = [t.train_time_s for t in self.trials if t.scored and t.train_time_s is not None]
        return {"strategy": self.strategy, "trials": len(self.trials), "outcomes": self.outcomes,
                "best": self.best_trial.best if self.best_trial else None,
                "best_trial": self.best_trial.trial_id if self.best_trial else None, "median": self.median,
                "trainable_share": statistics.median(shares) if shares else None,
                "median_train_time_s": statistics.median(times) if times else None}


@dataclass
class Analysis:
    """A `freezetune analyze` run (tag kind=analysis): layer importance of a base or fine-tuned model."""

    run_id: str
    run_name: str
    model: str
    source_run_id: str
    analysed: str
    importance: Importance

    def to_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "run_name": self.run_name, "model": self.model,
                "source_run_id": self.source_run_id or None, "analysed": self.analysed, "importance": self.importance}


@dataclass
class Comparison:
    """Everything `freezetune compare` shows: the ranked trials, configurations, strategies and the verdict."""

    uri: str
    metric: str
    mode: str
    label: str
    sweeps: list[dict[str, Any]]  # {run_id, name, experiment_id, status, trials}
    trials: list[Trial]  # in rank order (unranked last)
    configs: list[Configuration]
    strategies: list[StrategyGroup]
    varied: list[str]
    verdict: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    analyses: list[Analysis] = field(default_factory=list)  # Analysis runs of the selection (layer importance)

    @property
    def sign(self) -> int:
        return 1 if self.mode == "min" else -1

    @property
    def repeated(self) -> bool:
        """Some configuration ran under several seeds (then the configuration table matters)."""
        return any(c.n >= 2 for c in self.configs)

    def to_dict(self) -> dict[str, Any]:
        return {"tracking_uri": self.uri, "metric": self.metric, "mode": self.mode, "label": self.label,
                "sweeps": self.sweeps, "varied": self.varied, "verdict": self.verdict,
                "trials": [t.to_dict(self.varied) for t in self.trials],
                "configurations": [c.to_dict(self.varied) for c in self.configs],
                "strategies": [g.to_dict() for g in self.strategies], "notes": self.notes,
                "analyses": [a.to_dict() for a in self.analyses]}
