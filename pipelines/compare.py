"""`freezetune compare`: which strategy won, by how much, at what cost — read back from MLflow.

Selection: one or several sweeps (``--run`` parent run id or name, repeatable) or a whole
experiment (``--experiment``), against any tracking URI (SQLite file or ``mlflow server``).

What it does with the runs:

- one row per trial (a sweep's child run, or a plain training run): best metric and the epoch
  it came at, epochs reached of planned, outcome, trainable params and share, training time,
  wall time, tokens/s, peak memory, and the hyper-parameters that varied;
- ranking: finished trials first, then trials the scheduler stopped early (their best came
  from fewer epochs); still-running, failed and killed trials, and trials with no value of
  the metric, are shown but never get a rank;
- configurations: trials whose searched values (the ``sampled`` param) are equal, with the same
  base config (model, data, epochs, ...), but whose seeds differ form one configuration, reported as
  mean ± std over seeds. A lead smaller than the seed spread (the larger std of the two
  configurations compared) is called a tie, not a win;
- strategies: trial counts by outcome, best and median per strategy.

The report (PNG plots, a self-contained HTML page and a markdown page, JSON and CSV) is
written by ``pipelines.report`` and logged to each selected sweep's parent run under
``compare/``. This module imports nothing heavy at import time (the CLI's ``--help`` stays fast).
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from . import tracking

DEFAULT_METRIC = "eval_loss"
SCORED = ("finished", "stopped_early")  # outcomes that get a rank (in this order of tiers)
OUTCOME_ORDER = {"finished": 0, "stopped_early": 1, "running": 2, "killed": 3, "failed": 4}
COST_KEYS = ("epoch_seconds", "tokens_per_s", "peak_memory_mb")
LR_KEYS = ("strategy.lr", "strategy.vision_lr", "strategy.connector_lr", "strategy.llm_lr")
# params that say where/how a run was stored, not what was trained: never part of a configuration's identity
NOT_CONFIG = {"seed", "trial_id", "sampled", "model_path", "name", "storage_path", "cache_dir", "data.n_train",
              "data.n_eval", "mlflow.tracking_uri", "mlflow.experiment"}


# --- rows ------------------------------------------------------------------------------

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
    curve: list[tuple[int, float]]  # the metric per epoch
    best: float | None
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
    importance: dict[str, dict[str, dict[str, float]]]  # phase (before/after/base) -> measure -> unit -> score
    last_update: float | None  # epoch seconds of the newest metric
    rank: int | None = None
    config_id: int | None = None

    @property
    def scored(self) -> bool:
        return self.outcome in SCORED and self.best is not None

    @property
    def tier(self) -> int:
        return OUTCOME_ORDER.get(self.outcome, 4) if self.scored else 2 + OUTCOME_ORDER.get(self.outcome, 4)

    def lr(self, key: str) -> float | None:
        return _number(self.params.get(key))

    def to_dict(self, varied: Iterable[str] = ()) -> dict[str, Any]:
        return {
            "rank": self.rank, "trial_id": self.trial_id, "run_id": self.run_id, "run_name": self.run_name,
            "sweep": self.sweep, "sweep_run_id": self.sweep_run_id, "strategy": self.strategy, "model": self.model,
            "config_id": self.config_id, "seed": self.seed, "outcome": self.outcome, "error": self.error or None,
            "best": self.best, "best_epoch": self.best_epoch, "epochs_reached": self.epochs_reached,
            "epochs_planned": self.epochs_planned, "trainable_params": _int(self.trainable_params),
            "trainable_share": self.trainable_share, "trainable_share_source": self.share_source or None,
            "train_time_s": self.train_time_s, "wall_time_s": self.wall_time_s, "tokens_per_s": self.tokens_per_s,
            "peak_memory_mb": self.peak_memory_mb,
            "varied": {k: _value(self.params.get(k, self.sampled.get(k))) for k in varied},
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
        return statistics.stdev(self.scores) if self.n >= 2 else None

    @property
    def tier(self) -> int:
        return min(t.tier for t in self.trials)

    @property
    def ranked(self) -> bool:
        return self.n > 0

    def values(self, varied: Iterable[str]) -> dict[str, Any]:
        first = self.trials[0]
        return {k: _value(first.params.get(k, first.sampled.get(k))) for k in varied}

    def to_dict(self, varied: Iterable[str] = ()) -> dict[str, Any]:
        return {"config_id": self.id, "rank": self.rank, "strategy": self.strategy, "model": self.model,
                "values": self.values(varied), "seeds": sorted(t.seed for t in self.trials if t.seed is not None),
                "n_scored": self.n, "mean": self.mean, "std": self.std,
                "min": min(self.scores) if self.scores else None, "max": max(self.scores) if self.scores else None,
                "outcomes": _count(t.outcome for t in self.trials), "gap_to_next": self.gap_to_next,
                "spread_vs_next": self.spread_vs_next, "vs_next": self.vs_next,
                "trial_ids": [t.trial_id for t in self.trials]}


@dataclass
class StrategyGroup:
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
class Comparison:
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
    analyses: list[Any] = field(default_factory=list)  # Analysis runs of the selection (layer importance)

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


# --- reading MLflow --------------------------------------------------------------------

def _search(c, experiment_ids: list[str], filter_string: str = "") -> list:
    """Every matching active run (paged)."""
    out, token = [], None
    while True:
        page = tracking._retry(c.search_runs, experiment_ids, filter_string=filter_string, max_results=1000,
                               page_token=token)
        out.extend(page)
        token = getattr(page, "token", None)
        if not token:
            return out


def _children(c, parent) -> list:
    runs = _search(c, [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    return [r for r in runs if r.data.tags.get("kind") != "analysis"]


def _quote(text: str) -> str:
    return f'"{text}"' if "'" in text else f"'{text}'"


def _experiment_ids(c, experiment: str | None) -> list[str]:
    if experiment:
        exp = c.get_experiment_by_name(experiment)
        if exp is None:
            names = sorted(e.name for e in c.search_experiments())
            raise ValueError(f"--experiment {experiment!r}: no such experiment at this tracking URI; "
                             f"experiments there: {', '.join(names) or '(none)'}.")
        return [exp.experiment_id]
    return [e.experiment_id for e in c.search_experiments()]


def recent_sweeps(c, experiment_ids: list[str], limit: int = 10) -> list:
    return tracking._retry(c.search_runs, experiment_ids, filter_string="tags.kind = 'sweep'",
                           order_by=["attributes.start_time DESC"], max_results=limit)


def _sweep_hint(c, experiment_ids: list[str]) -> str:
    runs = recent_sweeps(c, experiment_ids)
    if not runs:
        return "no sweep parent runs (tag kind=sweep) found there."
    when = lambda r: time.strftime("%Y-%m-%d %H:%M", time.localtime(r.info.start_time / 1000))  # noqa: E731
    lines = [f"  {r.info.run_id}  {r.info.run_name}  ({when(r)}, {r.info.status.lower()})" for r in runs]
    return "recent sweeps:\n" + "\n".join(lines)


def _find_run(c, ref: str, experiment_ids: list[str]):
    """A run by id, else by name (a sweep's parent preferred); an ambiguous name is an error listing the ids."""
    if re.fullmatch(r"[0-9a-f]{32}", ref):
        try:
            return c.get_run(ref)
        except Exception:  # MlflowException RESOURCE_DOES_NOT_EXIST; fall through to the name search
            pass
    matches = _search(c, experiment_ids, f"attributes.run_name = {_quote(ref)}")
    sweeps = [r for r in matches if r.data.tags.get("kind") == "sweep"]
    matches = sweeps or matches
    if not matches:
        raise ValueError(f"--run {ref!r}: no run with this id or name; " + _sweep_hint(c, experiment_ids))
    if len(matches) > 1:
        listed = ", ".join(f"{r.info.run_id} (experiment {r.info.experiment_id})" for r in matches[:10])
        raise ValueError(f"--run {ref!r}: {len(matches)} runs have this name: {listed}; pass the run id instead.")
    return matches[0]


def _history(c, run_id: str, key: str) -> list[tuple[int, float, int]]:
    """(step, value, timestamp) sorted by step; a step logged twice keeps its newest value."""
    by_step: dict[int, tuple[float, int]] = {}
    for m in tracking._retry(c.get_metric_history, run_id, key):
        if m.step not in by_step or m.timestamp >= by_step[m.step][1]:
            by_step[m.step] = (m.value, m.timestamp)
    return [(s, v, ts) for s, (v, ts) in sorted(by_step.items())]


def _outcome(run) -> str:
    status, tag = run.info.status, run.data.tags.get("outcome")
    if status in ("RUNNING", "SCHEDULED"):
        return "running"  # a trial restarted after a failure still carries its old outcome tag
    if tag in ("finished", "stopped_early", "failed"):
        return tag
    return {"FAILED": "failed", "KILLED": "killed"}.get(status, "finished")


def trial_from_run(c, run, metric: str = DEFAULT_METRIC, mode: str = "min", parent=None,
                   now: float | None = None) -> Trial:
    """Read one run: its tags and params, the metric's history and the cost metrics."""
    info, tags, params, metrics = run.info, run.data.tags, run.data.params, run.data.metrics
    hist = {k: _history(c, info.run_id, k) for k in {metric, *COST_KEYS} if k in metrics}
    curve = [(s, v) for s, v, _ in hist.get(metric, []) if math.isfinite(v)]
    best_point = (min if mode == "min" else max)(curve, key=lambda p: p[1]) if curve else None
    try:
        sampled = json.loads(params.get("sampled") or "{}")
        sampled = sampled if isinstance(sampled, dict) else {}
    except ValueError:
        sampled = {}
    sampled.pop("seed", None)
    trainable = metrics.get("trainable_params", _number(tags.get("trainable_params")))
    share, source = _number(tags.get("trainable_share")), "logged"
    total = metrics.get("total_params", _number(tags.get("total_params")))
    if share is None and trainable is not None and total:
        share = trainable / total
    if share is None:
        source = ""
    seconds = [v for _, v, _ in hist.get("epoch_seconds", [])]
    speeds = [v for _, v, _ in hist.get("tokens_per_s", [])]
    memory = [v for _, v, _ in hist.get("peak_memory_mb", [])]
    stamps = [ts for h in hist.values() for _, _, ts in h]
    now = time.time() if now is None else now
    end = info.end_time / 1000 if info.end_time and info.status not in ("RUNNING", "SCHEDULED") else now
    importance = parse_importance(metrics)
    outcome = _outcome(run)
    return Trial(
        run_id=info.run_id, run_name=info.run_name or "",
        trial_id=tags.get("trial_id") or params.get("trial_id") or info.run_name or info.run_id[:8],
        sweep=parent.info.run_name if parent else "", sweep_run_id=parent.info.run_id if parent else "",
        experiment_id=info.experiment_id, strategy=params.get("strategy.name") or tags.get("strategy") or "?",
        model=tags.get("model") or params.get("model") or "", outcome=outcome,
        error=(tags.get("error") or "") if outcome in ("failed", "killed") else "",
        seed=_int(_number(params.get("seed"))), params=dict(params), sampled=sampled,
        curve=curve,
        best=best_point[1] if best_point else None, best_epoch=best_point[0] if best_point else None,
        epochs_reached=max((s for s, _ in curve), default=0), epochs_planned=_int(_number(params.get("train.epochs"))),
        trainable_params=trainable, trainable_share=share, share_source=source,
        train_time_s=sum(seconds) if seconds else None,
        wall_time_s=max(0.0, end - info.start_time / 1000) if info.start_time else None,
        tokens_per_s=statistics.fmean(speeds) if speeds else None, peak_memory_mb=max(memory) if memory else None,
        importance=importance, last_update=max(stamps) / 1000 if stamps else None,
    )


IMPORTANCE_KEY = re.compile(r"^importance(?:_(before|after))?/([A-Za-z0-9_]+)/(.+)$")
NOT_A_MEASURE = {"cost", "base_loss"}


def parse_importance(metrics: dict[str, float]) -> dict[str, dict[str, dict[str, float]]]:
    """Layer-importance metrics of a run → {phase: {measure: {unit: score}}}.

    ``importance/<measure>/<unit>`` (a `freezetune analyze` run: phase "base") and
    ``importance_{before,after}/<measure>/<unit>`` (a trial measured before / after fine-tuning);
    ``.../base_loss`` and ``.../cost/*`` are not scores.
    """
    out: dict[str, dict[str, dict[str, float]]] = {}
    for key, value in metrics.items():
        m = IMPORTANCE_KEY.match(key)
        if m and m.group(2) not in NOT_A_MEASURE and math.isfinite(value):
            out.setdefault(m.group(1) or "base", {}).setdefault(m.group(2), {})[m.group(3)] = value
    return out


@dataclass
class Analysis:
    """A `freezetune analyze` run (tag kind=analysis): layer importance of a base or fine-tuned model."""

    run_id: str
    run_name: str
    model: str
    source_run_id: str
    analysed: str
    importance: dict[str, dict[str, dict[str, float]]]

    def to_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "run_name": self.run_name, "model": self.model,
                "source_run_id": self.source_run_id or None, "analysed": self.analysed, "importance": self.importance}


def _analyses(c, runs: list, trials: list[Trial]) -> list[Analysis]:
    """Analysis runs that belong to the selection: those of a selected run, and base-model ones of its models."""
    selected = {t.run_id for t in trials}
    models = {t.model for t in trials}
    out = []
    for r in runs:
        tags = r.data.tags
        source = tags.get("source_run_id", "")
        if (source and source in selected) or (not source and tags.get("model") in models):
            importance = parse_importance(r.data.metrics)
            if importance:
                out.append(Analysis(r.info.run_id, r.info.run_name or "", tags.get("model", ""), source,
                                    tags.get("analysed", ""), importance))
    return out


def collect(uri: str, runs: Iterable[str] = (), experiment: str | None = None, metric: str | None = None,
            mode: str | None = None) -> Comparison:
    """Read the selected sweeps / experiment from MLflow and build the ranked comparison."""
    c = tracking.client(uri)
    runs = list(runs)
    if not runs and not experiment:
        raise ValueError("choose what to compare: --run SWEEP (parent run id or name, repeatable) or "
                         "--experiment NAME; " + _sweep_hint(c, _experiment_ids(c, None)))
    exp_ids = _experiment_ids(c, experiment)
    parents: list = []
    pairs: list[tuple[Any, Any]] = []  # (run, parent or None)
    if runs:
        for ref in runs:
            run = _find_run(c, ref, exp_ids)
            if any(p.info.run_id == run.info.run_id for p in parents):
                continue
            children = _children(c, run)
            if children or run.data.tags.get("kind") == "sweep":
                parents.append(run)
                pairs += [(child, run) for child in children]
            elif run.data.tags.get("kind") == "analysis":
                raise ValueError(f"--run {ref!r} is a `freezetune analyze` run (layer importance), not a sweep or a "
                                 "training run; compare the sweep or experiment it belongs to (its importance is "
                                 "plotted there).")
            else:  # a plain training run (or one trial) compared on its own
                pairs.append((run, None))
    else:
        everything = [r for r in _search(c, exp_ids) if r.data.tags.get("kind") != "analysis"]
        parent_ids = {r.data.tags.get("mlflow.parentRunId") for r in everything} - {None}
        by_id = {r.info.run_id: r for r in everything}
        parents = [r for r in everything if r.info.run_id in parent_ids or r.data.tags.get("kind") == "sweep"]
        parent_set = {p.info.run_id for p in parents}
        for r in everything:
            if r.info.run_id not in parent_set:
                pid = r.data.tags.get("mlflow.parentRunId")
                pairs.append((r, by_id.get(pid) or (c.get_run(pid) if pid else None)))
    parents.sort(key=lambda p: p.info.start_time or 0)
    if metric is None or mode is None:  # the sweep's own objective, else eval_loss (min)
        first = parents[0].data.params if parents else {}
        metric = metric or first.get("sweep.metric") or DEFAULT_METRIC
        mode = mode or first.get("sweep.mode") or "min"
    now = time.time()
    unique = {run.info.run_id: (run, parent) for run, parent in pairs}  # a run named twice is one row
    trials = [trial_from_run(c, run, metric, mode, parent, now) for run, parent in unique.values()]
    if experiment and not runs:
        label = experiment
    else:
        label = "+".join(p.info.run_name for p in parents) or "+".join(t.run_name for t in trials)
    sweeps = [{"run_id": p.info.run_id, "name": p.info.run_name, "experiment_id": p.info.experiment_id,
               "status": p.info.status, "trials": sum(t.sweep_run_id == p.info.run_id for t in trials)}
              for p in parents]
    trial_exps = sorted({t.experiment_id for t in trials})
    analyses = _analyses(c, _search(c, trial_exps, "tags.kind = 'analysis'"), trials) if trial_exps else []
    cmp = build_comparison(trials, uri=uri, metric=metric, mode=mode, label=_slug(label or "compare"), sweeps=sweeps)
    cmp.analyses = analyses
    return cmp


# --- ranking, configurations, strategies ---------------------------------------------------

def rank_trials(trials: list[Trial], mode: str = "min") -> list[Trial]:
    """Finished trials by their best value, then stopped-early ones; running/killed/failed/no-metric unranked.

    Returns a new list in that order and sets ``rank`` (1, 2, ...) on the scored trials only.
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


def group_configurations(trials: list[Trial], mode: str = "min") -> list[Configuration]:
    """Configurations ranked by mean over seeds; each compared with the next one (a lead within spread is a tie)."""
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
        if here.tier == nxt.tier:  # finished vs stopped early: different epoch budgets, no judgement
            here.gap_to_next, here.spread_vs_next, here.vs_next = judge(here, nxt, mode)
    return configs


def judge(a: Configuration, b: Configuration, mode: str = "min") -> tuple[float, float | None, str]:
    """(gap, spread, verdict) of a over b: a lead not larger than the seed spread is no win."""
    gap = (b.mean - a.mean) if mode == "min" else (a.mean - b.mean)
    stds = [s for s in (a.std, b.std) if s is not None]
    spread = max(stds) if stds else None
    if spread is None:
        return gap, None, "spread unknown"
    return gap, spread, "clear" if gap > spread else "within spread"


def group_strategies(trials: list[Trial]) -> list[StrategyGroup]:
    by: dict[str, list[Trial]] = {}
    for t in trials:  # trials come ranked: the first scored one of a strategy is its best
        by.setdefault(t.strategy, []).append(t)
    groups = []
    for name, ts in by.items():
        scored = [t for t in ts if t.scored]
        groups.append(StrategyGroup(name, ts, scored[0] if scored else None,
                                    statistics.median(t.best for t in scored) if scored else None,
                                    _count(t.outcome for t in ts)))
    return groups  # in the order of each strategy's best trial (strategies with none scored last)


def varied_keys(trials: list[Trial]) -> list[str]:
    """Searched or strategy settings that take more than one value across the trials (seed shown apart)."""
    candidates = {k for t in trials for k in t.sampled} | {k for t in trials for k in t.params if k.startswith("strategy.")}
    out = []
    for k in candidates - {"strategy.name", "seed", "sampled", "trial_id"}:
        values = {str(_value(t.params.get(k, t.sampled.get(k)))) for t in trials if k in t.params or k in t.sampled}
        if len(values) > 1:
            out.append(k)
    return sorted(out, key=lambda k: (not k.startswith("strategy."), k))


def make_verdict(configs: list[Configuration], trials: list[Trial], metric: str, mode: str,
                 varied: list[str]) -> dict[str, Any]:
    """The answer in words: best configuration, runner-up and whether the lead is a win; the same for strategies."""
    ranked = [g for g in configs if g.ranked]
    lines: list[str] = []
    out: dict[str, Any] = {"best_config": None, "runner_up_config": None, "clear_win": None, "best_strategy": None,
                           "runner_up_strategy": None, "strategy_clear_win": None}
    if not ranked:
        lines.append(f"No trial has a value of {metric} yet with outcome finished or stopped early: nothing to rank.")
    else:
        win = ranked[0]
        out["best_config"], out["best_strategy"] = win.id, win.strategy
        lines.append(f"Best configuration: #{win.id} {win.strategy}{_values_text(win, varied)}: {metric} "
                     f"{_mean_text(win)}" + ("" if win.tier == 0 else " — only from trials stopped early"))
        if len(ranked) > 1:
            ru = ranked[1]
            out["runner_up_config"] = ru.id
            out["clear_win"] = win.vs_next == "clear" if win.vs_next != "spread unknown" else None
            lines.append(f"Runner-up: #{ru.id} {ru.strategy}{_values_text(ru, varied)}: {_mean_text(ru)}. "
                         + _judgement_text(win, f"#{win.id}", f"#{ru.id}"))
        other = next((g for g in ranked if g.strategy != win.strategy), None)
        if other is not None:
            out["runner_up_strategy"] = other.strategy
            gap, spread, how = judge(win, other, mode)
            out["strategy_clear_win"] = None if how == "spread unknown" else how == "clear"
            probe = Configuration("", win.strategy, win.model, win.trials, gap_to_next=gap, spread_vs_next=spread,
                                  vs_next=how)
            if other is ranked[1]:  # the runner-up line above already compared the two strategies
                lines.append(f"Best strategy: {win.strategy}, "
                             + {"clear": f"a clear win over {other.strategy}.",
                                "within spread": f"tied with {other.strategy} (see the runner-up above).",
                                "spread unknown": f"ahead of {other.strategy}, seed spread unknown."}[how])
            else:
                lines.append(f"Best strategy: {win.strategy}; next best strategy: {other.strategy} (#{other.id}, "
                             f"{_mean_text(other)}). " + _judgement_text(probe, win.strategy, other.strategy))
    counts = _count(t.outcome for t in trials)
    unranked = [f"{counts[k]} {k.replace('_', ' ')}" for k in ("running", "failed", "killed") if counts.get(k)]
    no_metric = sum(1 for t in trials if t.outcome in SCORED and t.best is None)
    if no_metric:
        unranked.append(f"{no_metric} without any {metric}")
    if unranked:
        lines.append("Not ranked: " + ", ".join(unranked) + ".")
    if counts.get("stopped_early"):
        lines.append(f"{counts['stopped_early']} trial(s) stopped early by the scheduler: ranked after every "
                     "finished trial (their best comes from fewer epochs).")
    out["text"] = lines
    return out


def _judgement_text(a: Configuration, a_name: str, b_name: str) -> str:
    gap = _fmt(a.gap_to_next)
    if a.vs_next == "clear":
        return f"{a_name} leads by {gap}, more than the seed spread ({_fmt(a.spread_vs_next)}): a clear win."
    if a.vs_next == "within spread":
        return (f"The gap {gap} is within the seed spread ({_fmt(a.spread_vs_next)}): not a win — "
                f"treat {a_name} and {b_name} as tied.")
    return (f"{a_name} leads by {gap}; each ran under one seed, so the seed spread is unknown "
            "(run with sweep.seeds >= 2 to tell a win from seed noise).")


def build_comparison(trials: list[Trial], uri: str = "", metric: str = DEFAULT_METRIC, mode: str = "min",
                     label: str = "compare", sweeps: list[dict] | None = None) -> Comparison:
    if mode not in ("min", "max"):
        raise ValueError(f"--mode {mode!r}: use min or max.")
    trials = rank_trials(trials, mode)
    notes = _fill_shares(trials)
    configs = group_configurations(trials, mode)
    groups = group_strategies(trials)
    varied = varied_keys(trials)
    verdict = make_verdict(configs, trials, metric, mode, varied)
    return Comparison(uri, metric, mode, label, sweeps or [], trials, configs, groups, varied, verdict, notes)


def _fill_shares(trials: list[Trial]) -> list[str]:
    """Trials without a logged share: trainable / trainable of a `full` run on the same model (which trains all)."""
    missing = [t for t in trials if t.trainable_share is None and t.trainable_params]
    if not missing:
        return []
    totals: dict[str, float] = {}
    for t in trials:
        if t.strategy == "full" and t.trainable_params:
            totals[t.model] = max(totals.get(t.model, 0.0), t.trainable_params)
    filled = 0
    for t in missing:
        if t.model in totals:
            t.trainable_share, t.share_source = t.trainable_params / totals[t.model], "estimated"
            filled += 1
    notes = []
    if filled:
        notes.append(f"trainable share of {filled} trial(s) is estimated (marked ~): their trainable_params over "
                     "those of a `full` run on the same model; the runs do not log their total parameter count.")
    if filled < len(missing):
        notes.append(f"trainable share unknown for {len(missing) - filled} trial(s): no `trainable_share` tag, "
                     "no `total_params`, and no `full` run of the same model to compare with.")
    return notes


# --- text, JSON, CSV ---------------------------------------------------------------------

def _short_key(key: str) -> str:
    return key[len("strategy."):] if key.startswith("strategy.") else key


def trial_table(cmp: Comparison) -> tuple[list[str], list[list[Any]]]:
    many = len({t.sweep_run_id for t in cmp.trials}) > 1
    headers = ["rank"] + (["sweep"] if many else []) + ["trial", "strategy"] + [_short_key(k) for k in cmp.varied] + [
        "seed", f"best {cmp.metric}", "@ep", "epochs", "outcome", "trainable", "share", "train s", "wall s", "tok/s",
        "peak MB", "note"]
    rows = []
    for t in cmp.trials:
        rows.append([t.rank] + ([t.sweep or "-"] if many else []) + [t.trial_id, t.strategy]
                    + [_display(_value(t.params.get(k, t.sampled.get(k)))) for k in cmp.varied]
                    + [t.seed, t.best, t.best_epoch, _epochs_text(t), t.outcome.replace("_", " "),
                       _human(t.trainable_params), _share_text(t), _round(t.train_time_s), _round(t.wall_time_s),
                       _round(t.tokens_per_s), _round(t.peak_memory_mb), _note(t)])
    return headers, rows


def config_table(cmp: Comparison) -> tuple[list[str], list[list[Any]]]:
    headers = ["rank", "config", "strategy"] + [_short_key(k) for k in cmp.varied] + [
        "seeds", f"mean {cmp.metric}", "± std", "min", "max", "lead over next", "seed spread", "win?"]
    rows = []
    for g in cmp.configs:
        rows.append([g.rank, f"#{g.id}", g.strategy] + [_display(v) for v in g.values(cmp.varied).values()]
                    + [_seeds_text(g), g.mean, g.std, min(g.scores) if g.scores else None,
                       max(g.scores) if g.scores else None, g.gap_to_next, g.spread_vs_next,
                       {"clear": "yes", "within spread": "no (tie)", "spread unknown": "unknown (1 seed)"}.get(
                           g.vs_next or "")])
    return headers, rows


def strategy_table(cmp: Comparison) -> tuple[list[str], list[list[Any]]]:
    headers = ["strategy", "trials", "finished", "stopped early", "running", "failed", f"best {cmp.metric}",
               "median", "best trial", "share", "median train s"]
    rows = []
    for g in cmp.strategies:
        d = g.to_dict()
        oc = g.outcomes
        rows.append([g.strategy, len(g.trials), oc.get("finished", 0), oc.get("stopped_early", 0),
                     oc.get("running", 0), oc.get("failed", 0) + oc.get("killed", 0), d["best"], d["median"],
                     d["best_trial"], _group_share_text(g, d["trainable_share"]), _round(d["median_train_time_s"])])
    return headers, rows


def render_text(cmp: Comparison) -> str:
    from .tables import format_table

    where = ", ".join(f"{s['name']} ({s['run_id'][:8]}, {s['trials']} trials)" for s in cmp.sweeps) or cmp.label
    parts = [f"Comparing {len(cmp.trials)} run(s) from {where} at {cmp.uri}; {cmp.metric} ({cmp.mode}imise)."]
    h, r = trial_table(cmp)
    parts.append(format_table(h, r, title="Trials, ranked (finished first, then stopped early; others unranked):"))
    if cmp.repeated:
        h, r = config_table(cmp)
        parts.append(format_table(h, r, title="Configurations (same searched values, different seeds): mean ± std "
                                              "over seeds; a lead within the seed spread is no win:"))
    h, r = strategy_table(cmp)
    parts.append(format_table(h, r, title="By strategy:"))
    parts.append("\n".join(cmp.verdict["text"] + [f"note: {n}" for n in cmp.notes]))
    return "\n\n".join(parts)


CSV_FIELDS = ["rank", "trial_id", "run_id", "sweep", "strategy", "config_id", "seed", "outcome", "best", "best_epoch",
              "epochs_reached", "epochs_planned", "trainable_params", "trainable_share", "trainable_share_source",
              "train_time_s", "wall_time_s", "tokens_per_s", "peak_memory_mb", "config_mean", "config_std",
              "config_seeds", "error"]


def to_csv(cmp: Comparison) -> str:
    """One line per trial (rank order), with its configuration's mean/std and the varied settings."""
    buf = io.StringIO()
    fields = CSV_FIELDS + cmp.varied
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    configs = {g.id: g for g in cmp.configs}
    for t in cmp.trials:
        d = t.to_dict(cmp.varied)
        g = configs.get(t.config_id)
        row = {k: d.get(k) for k in CSV_FIELDS if k in d}
        row.update(config_mean=g.mean if g else None, config_std=g.std if g else None, config_seeds=g.n if g else None)
        row.update({k: d["varied"].get(k) for k in cmp.varied})
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return buf.getvalue()


def to_json(cmp: Comparison) -> str:
    return json.dumps(cmp.to_dict(), indent=1, default=str)


# --- logging the report to MLflow -----------------------------------------------------------

def log_report(cmp: Comparison, files: dict[str, Path]) -> list[str]:
    """The report's files as artifacts of every selected sweep's parent run: compare/ (+ compare/plots/)."""
    logged = []
    for s in cmp.sweeps:
        for name, path in files.items():
            folder = "compare/plots" if Path(path).suffix == ".png" else "compare"
            tracking.log_files(cmp.uri, s["run_id"], [path], folder)
        tracking.set_tags(cmp.uri, s["run_id"], {"freezetune.compare.report": "compare/report.html"})
        logged.append(s["run_id"])
    return logged


# --- the subcommand ----------------------------------------------------------------------------

def add_arguments(parser) -> None:
    parser.add_argument("--run", action="append", default=[], metavar="SWEEP",
                        help="a sweep's parent run id or name (repeatable: several sweeps side by side); "
                             "a plain training run is compared as one row")
    parser.add_argument("--experiment", help="compare every run of this MLflow experiment (with --run: where to "
                                             "look the names up)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
                                               "sqlite:///mlflow.db); an http(s):// mlflow server works too")
    parser.add_argument("--metric", help="metric to rank by (default: the sweep's own, else eval_loss)")
    parser.add_argument("--mode", choices=["min", "max"], help="min or max (default: the sweep's own, else min)")
    parser.add_argument("--out", help="report folder (default: ./freezetune-compare/<sweep or experiment name>)")
    parser.add_argument("--format", choices=["table", "json", "csv"], default="table",
                        help="what goes to stdout: tables and the verdict, one JSON object, or CSV (one line per "
                             "trial)")
    parser.add_argument("--no-log", action="store_true", help="do not log the report to the sweep's parent run")
    parser.add_argument("--no-report", action="store_true", help="no plots or report files, stdout only")


def main(args) -> int:
    import os

    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).expanduser().exists():
        raise ValueError(f"--tracking-uri {uri}: no such MLflow store file; pass --tracking-uri (an "
                         "http://host:port of an mlflow server, or sqlite:///path/to/mlflow.db).")
    tracking.check_tracking_uri(uri)
    cmp = collect(uri, runs=args.run, experiment=args.experiment, metric=args.metric, mode=args.mode)
    if not cmp.trials:
        raise ValueError(f"nothing to compare: {cmp.label} has no trial runs (a sweep that has not started any?).")
    info = sys.stdout if args.format == "table" else sys.stderr  # keep stdout machine-readable for json/csv
    files: dict[str, Path] = {}
    logged: list[str] = []
    if not args.no_report:
        from .report import write_report

        out = Path(args.out) if args.out else Path("freezetune-compare") / cmp.label
        files = write_report(cmp, out)
        if not args.no_log:
            logged = log_report(cmp, files)
    if args.format == "json":
        data = cmp.to_dict()
        data["report"] = {k: str(v) for k, v in files.items()}
        data["logged_to"] = logged
        print(json.dumps(data, indent=1, default=str))
    elif args.format == "csv":
        print(to_csv(cmp), end="")
    else:
        print(render_text(cmp))
    if files:
        print(f"\nreport: {files['report.html']} (+ report.md, {sum(p.suffix == '.png' for p in files.values())} "
              f"PNG plots, compare.json, CSVs)" + (f"; logged to run(s) {', '.join(logged)} under compare/"
                                                    if logged else ""), file=info)
        if not args.no_log and not cmp.sweeps:
            print("note: the selection holds no sweep parent run; the report stays on disk only.", file=info)
    return 0


# --- formatting helpers ----------------------------------------------------------------------

def _number(value) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _int(value) -> int | None:
    return int(value) if value is not None else None


def _value(value):
    """A param string as the number it is (ints as int), other text as is; None stays None."""
    if value is None or isinstance(value, (int, float)):
        return value
    number = _number(value)
    if number is None:
        return value
    return int(number) if number.is_integer() and "e" not in str(value).lower() and "." not in str(value) else number


def _display(value):
    """Small floats (learning rates) as 5e-4 rather than 0.0005; everything else unchanged."""
    if isinstance(value, float) and value != 0 and abs(value) < 1e-2:
        mantissa, exp = f"{value:.2e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exp)}"
    return value


def _count(items: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        out[item] = out.get(item, 0) + 1
    return out


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if abs(value) < 1e-2 or abs(value) >= 1e4 else f"{value:.4g}"


def _mean_text(g: Configuration) -> str:
    """'1.060 ± 0.014 (mean ± std over 2 seeds)': the mean to the std's precision (3 decimals at least)."""
    if g.n >= 2:
        decimals = max(3, 1 - math.floor(math.log10(g.std))) if g.std > 0 else 3
        return f"{g.mean:.{decimals}f} ± {g.std:.{decimals}f} (mean ± std over {g.n} seeds)"
    return f"{g.mean:.3f} (1 seed)"


def _values_text(g: Configuration, varied: list[str]) -> str:
    values = {k: v for k, v in g.values(varied).items() if v is not None}
    return " (" + ", ".join(f"{_short_key(k)}={_display(v)}" for k, v in values.items()) + ")" if values else ""


def _seeds_text(g: Configuration) -> str:
    """'3 (0,1,2)': scored seeds; unscored trials of the configuration by outcome: '0; 1 running'."""
    seeds = sorted(t.seed for t in g.trials if t.scored and t.seed is not None)
    text = f"{g.n}" + (f" ({','.join(map(str, seeds))})" if seeds else "")
    unscored = _count(t.outcome.replace("_", " ") for t in g.trials if not t.scored)
    return text + "".join(f"; {n} {o}" for o, n in unscored.items())


def _epochs_text(t: Trial) -> str:
    return f"{t.epochs_reached}/{t.epochs_planned}" if t.epochs_planned else str(t.epochs_reached)


def _human(n: float | None) -> str | None:
    if n is None:
        return None
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{suffix}"
    return str(int(n))


def _pct(share: float | None) -> str | None:
    if share is None:
        return None
    return f"{share * 100:.3g}%"


def _share_text(t: Trial) -> str | None:
    text = _pct(t.trainable_share)
    return ("~" + text) if text and t.share_source == "estimated" else text


def _group_share_text(g: StrategyGroup, share: float | None) -> str | None:
    estimated = any(t.share_source == "estimated" for t in g.trials)
    return None if share is None else ("~" if estimated else "") + _pct(share)


def _round(value: float | None) -> float | int | None:
    if value is None:
        return None
    if abs(value) >= 1000:
        return int(round(value))
    return round(value, 1) if abs(value) >= 10 else round(value, 3)


def _note(t: Trial) -> str | None:
    if t.error:
        last = [line for line in t.error.strip().splitlines() if line.strip()]
        text = last[-1].strip() if last else t.error
        return text[:60] + ("…" if len(text) > 60 else "")
    if t.outcome == "running" and t.last_update:
        return f"last update {_age(time.time() - t.last_update)} ago"
    if t.outcome in SCORED and t.best is None:
        return "no metric logged"
    return None


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}min"
    return f"{seconds / 3600:.1f}h"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text)[:80] or "compare"


if __name__ == "__main__":  # `python -m pipelines.compare ...` until the CLI grows the subcommand
    import argparse

    _parser = argparse.ArgumentParser(prog="freezetune compare", description=__doc__.split("\n")[0])
    add_arguments(_parser)
    try:
        sys.exit(main(_parser.parse_args()))
    except (ValueError, OSError, tracking.TrackingError) as _err:
        print(f"freezetune compare: error: {_err}", file=sys.stderr)
        sys.exit(2)
