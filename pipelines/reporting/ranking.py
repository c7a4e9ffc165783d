"""The ranking and tie rules of `freezetune compare`, as pure functions (no MLflow, no I/O).

- a trial's best value: the min (or max) of its finite values, the earliest epoch on a tie; NaN/inf are missing;
- trials: finished ones by best value, then those the scheduler stopped early (their best came from fewer
  epochs); running, killed and failed trials, and trials without a value, are kept but never ranked;
- configurations: trials that differ only in the seed, ranked by their mean over seeds; a lead over the
  next one that is not larger than the seed spread (the larger std of the two) is a tie, not a win;
- strategies: in the order of their best trial.
"""

from __future__ import annotations

import json
import math
import statistics
from typing import Iterable

from pipelines.reporting.trials import Configuration, StrategyGroup, Trial, count

# params that say where/how a run was stored, not what was trained: never part of a configuration's identity
NOT_CONFIG = {"seed", "trial_id", "sampled", "model_path", "name", "storage_path", "cache_dir", "data.n_train",
              "data.n_eval", "mlflow.tracking_uri", "mlflow.experiment"}


def check_mode(mode: str) -> None:
    if mode not in ("min", "max"):
        raise ValueError(f"--mode {mode!r}: use min or max.")


def finite_curve(points: Iterable[tuple[int, float]]) -> list[tuple[int, float]]:
    """The metric per epoch without NaN/inf values: a diverged epoch is a missing value, never a best."""
    return [(step, value) for step, value in points if math.isfinite(value)]


def best_point(curve: list[tuple[int, float]], mode: str = "min") -> tuple[int, float] | None:
    """(epoch, value) of the best value of a finite curve, the earliest on a tie; None for an empty curve."""
    if not curve:
        return None
    return (min if mode == "min" else max)(curve, key=lambda p: p[1])


def rank_trials(trials: list[Trial], mode: str = "min") -> list[Trial]:
    """Finished trials by their best value, then stopped-early ones; running/killed/failed/no-metric unranked.

    Returns a new list in that order (ties on the value by trial id) and sets ``rank`` (1, 2, ...) on the
    scored trials only.
    """
    sign = 1 if mode == "min" else -1
    out = sorted(trials, key=lambda t: (t.tier, sign * t.best if t.best is not None else math.inf, t.trial_id))
    rank = 0
    for t in out:
        t.rank = None
        if t.scored:
            rank += 1
            t.rank = rank
    return out


def config_key(t: Trial) -> str:
    """Runs whose configs differ only in the seed → one configuration.

    Within a sweep that means equal ``sampled`` values (every trial shares the base config); across
    sweeps the whole flattened config must match too (same model, data, epochs, ...), minus what only
    says where a run was stored or how many workers ran it.
    """
    values = {k: v for k, v in t.params.items() if k not in NOT_CONFIG and not k.startswith("resources.")}
    values.update({k: str(v) for k, v in t.sampled.items() if k != "seed" and k not in values})
    return json.dumps({"model": t.model, "strategy": t.strategy, "values": values}, sort_keys=True, default=str)


def judge(a: Configuration, b: Configuration, mode: str = "min") -> tuple[float, float | None, str]:
    """(gap, spread, verdict) of a over b: a lead not larger than the seed spread is no win.

    verdict: "clear" (gap > spread), "within spread" (gap <= spread) or "spread unknown" (one seed each).
    """
    gap = (b.mean - a.mean) if mode == "min" else (a.mean - b.mean)
    stds = [s for s in (a.std, b.std) if s is not None]
    spread = max(stds) if stds else None
    if spread is None:
        return gap, None, "spread unknown"
    return gap, spread, "clear" if gap > spread else "within spread"


def group_configurations(trials: list[Trial], mode: str = "min") -> list[Configuration]:
    """Configurations ranked by mean over seeds; each compared with the next one (a lead within spread is a tie).

    Sets ``id`` (1, 2, ... in this order), ``rank`` (configurations with a scored trial) and the trials'
    ``config_id``. Only neighbours in the same tier are judged: finished vs stopped early compares
    different epoch budgets.
    """
    groups: dict[str, Configuration] = {}
    for t in trials:
        key = config_key(t)
        groups.setdefault(key, Configuration(key, t.strategy, t.model, [])).trials.append(t)
    sign = 1 if mode == "min" else -1
    configs = sorted(groups.values(), key=lambda g: (not g.ranked, g.tier, sign * g.mean if g.ranked else 0,
                                                     g.trials[0].trial_id))
    for i, g in enumerate(configs, 1):
        g.id = i
        g.rank = i if g.ranked else None
        for t in g.trials:
            t.config_id = i
    ranked = [g for g in configs if g.ranked]
    for here, nxt in zip(ranked, ranked[1:]):
        if here.tier == nxt.tier:
            here.gap_to_next, here.spread_vs_next, here.vs_next = judge(here, nxt, mode)
    return configs


def group_strategies(trials: list[Trial]) -> list[StrategyGroup]:
    """One group per strategy, from trials in rank order: the first scored trial of a strategy is its best."""
    by: dict[str, list[Trial]] = {}
    for t in trials:
        by.setdefault(t.strategy, []).append(t)
    groups = []
    for name, ts in by.items():
        scored = [t for t in ts if t.scored]
        groups.append(StrategyGroup(name, ts, scored[0] if scored else None,
                                    statistics.median(t.best for t in scored) if scored else None,
                                    count(t.outcome for t in ts)))
    return groups  # in the order of each strategy's best trial (strategies with none scored last)


def varied_keys(trials: list[Trial]) -> list[str]:
    """Searched or strategy settings that take more than one value across the trials (seed shown apart)."""
    candidates = {k for t in trials for k in t.sampled}
    candidates |= {k for t in trials for k in t.params if k.startswith("strategy.")}
    out = []
    for k in candidates - {"strategy.name", "seed", "sampled", "trial_id"}:
        values = {str(t.value(k)) for t in trials if k in t.params or k in t.sampled}
        if len(values) > 1:
            out.append(k)
    return sorted(out, key=lambda k: (not k.startswith("strategy."), k))
