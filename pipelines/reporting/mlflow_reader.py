"""Reading a comparison back from MLflow: the selected sweeps / experiment → ``Trial`` rows → ``Comparison``.

Selection: one or several sweeps (a parent run id or name, a sweep's parent preferred) or a whole
experiment, against any tracking URI (SQLite file or ``mlflow server``). A plain training run is
compared as one row; `freezetune analyze` runs (tag kind=analysis) are never rows, but their layer
importance is kept for the plots. Every MLflow call goes through ``pipelines.tracking`` (its retries).
"""

from __future__ import annotations

import json
import math
import re
import statistics
import time
from typing import Any, Iterable

from pipelines import tracking
from pipelines.tracking import retry
from pipelines.reporting.comparison import build_comparison
from pipelines.reporting.ranking import best_point, finite_curve
from pipelines.reporting.trials import DEFAULT_METRIC, Analysis, Comparison, Importance, Trial, as_int, number

COST_KEYS = ("epoch_seconds", "tokens_per_s", "peak_memory_mb")
IMPORTANCE_KEY = re.compile(r"^importance(?:_(before|after))?/([A-Za-z0-9_]+)/(.+)$")
NOT_A_MEASURE = {"cost", "base_loss"}


# --- finding runs ------------------------------------------------------------------------------


def _search(c, experiment_ids: list[str], filter_string: str = "") -> list:
    """Every matching active run (paged)."""
    out, token = [], None
    while True:
        page = retry(c.search_runs, experiment_ids, filter_string=filter_string, max_results=1000, page_token=token)
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
    """The newest sweep parent runs (tag kind=sweep), newest first."""
    return retry(c.search_runs, experiment_ids, filter_string="tags.kind = 'sweep'",
                  order_by=["attributes.start_time DESC"], max_results=limit)


def _sweep_hint(c, experiment_ids: list[str]) -> str:
    """What an error about the selection lists: the recent sweeps, to copy a run id or name from."""
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


# --- one run → one Trial -------------------------------------------------------------------------


def _history(c, run_id: str, key: str) -> list[tuple[int, float, int]]:
    """(step, value, timestamp) sorted by step; a step logged twice keeps its newest value."""
    by_step: dict[int, tuple[float, int]] = {}
    for m in retry(c.get_metric_history, run_id, key):
        if m.step not in by_step or m.timestamp >= by_step[m.step][1]:
            by_step[m.step] = (m.value, m.timestamp)
    return [(s, v, ts) for s, (v, ts) in sorted(by_step.items())]


def outcome_of(run) -> str:
    """finished | stopped_early | running | killed | failed, from the run's status and its `outcome` tag."""
    status, tag = run.info.status, run.data.tags.get("outcome")
    if status in ("RUNNING", "SCHEDULED"):
        return "running"  # a trial restarted after a failure still carries its old outcome tag
    if tag in ("finished", "stopped_early", "failed"):
        return tag
    return {"FAILED": "failed", "KILLED": "killed"}.get(status, "finished")


def parse_importance(metrics: dict[str, float]) -> Importance:
    """Layer-importance metrics of a run → {phase: {measure: {unit: score}}}.

    ``importance/<measure>/<unit>`` (a `freezetune analyze` run: phase "base") and
    ``importance_{before,after}/<measure>/<unit>`` (a trial measured before / after fine-tuning);
    ``.../base_loss`` and ``.../cost/*`` are not scores.
    """
    out: Importance = {}
    for key, value in metrics.items():
        m = IMPORTANCE_KEY.match(key)
        if m and m.group(2) not in NOT_A_MEASURE and math.isfinite(value):
            out.setdefault(m.group(1) or "base", {}).setdefault(m.group(2), {})[m.group(3)] = value
    return out


def _sampled(params: dict[str, str]) -> dict[str, Any]:
    """The trial's searched values (the `sampled` param, JSON), without the seed; {} when absent or unreadable."""
    try:
        sampled = json.loads(params.get("sampled") or "{}")
        sampled = sampled if isinstance(sampled, dict) else {}
    except ValueError:
        sampled = {}
    sampled.pop("seed", None)
    return sampled


def _epochs_reached(curve: list, hist: dict, metric: str) -> int:
    """The last epoch with a finite metric, or with cost metrics: a trial without eval data trained its epochs
    too (its eval_loss is absent; NaN values are no epoch reached)."""
    costs = (s for key, h in hist.items() if key != metric for s, _, _ in h)
    return max(max((s for s, _ in curve), default=0), max(costs, default=0))


def trial_from_run(c, run, metric: str = DEFAULT_METRIC, mode: str = "min", parent=None,
                   now: float | None = None) -> Trial:
    """Read one run: its tags and params, the metric's history and the cost metrics."""
    info, tags, params, metrics = run.info, run.data.tags, run.data.params, run.data.metrics
    hist = {k: _history(c, info.run_id, k) for k in {metric, *COST_KEYS} if k in metrics}
    curve = finite_curve((s, v) for s, v, _ in hist.get(metric, []))
    best = best_point(curve, mode)
    trainable = metrics.get("trainable_params", number(tags.get("trainable_params")))
    share, source = number(tags.get("trainable_share")), "logged"
    total = metrics.get("total_params", number(tags.get("total_params")))
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
    outcome = outcome_of(run)
    return Trial(
        run_id=info.run_id, run_name=info.run_name or "",
        trial_id=tags.get("trial_id") or params.get("trial_id") or info.run_name or info.run_id[:8],
        sweep=parent.info.run_name if parent else "", sweep_run_id=parent.info.run_id if parent else "",
        experiment_id=info.experiment_id, strategy=params.get("strategy.name") or tags.get("strategy") or "?",
        model=tags.get("model") or params.get("model") or "", outcome=outcome,
        error=(tags.get("error") or "") if outcome in ("failed", "killed") else "",
        seed=as_int(number(params.get("seed"))), params=dict(params), sampled=_sampled(params),
        curve=curve,
        best=best[1] if best else None, best_epoch=best[0] if best else None,
        epochs_reached=_epochs_reached(curve, hist, metric), epochs_planned=as_int(number(params.get("train.epochs"))),
        trainable_params=trainable, trainable_share=share, share_source=source,
        train_time_s=sum(seconds) if seconds else None,
        wall_time_s=max(0.0, end - info.start_time / 1000) if info.start_time else None,
        tokens_per_s=statistics.fmean(speeds) if speeds else None, peak_memory_mb=max(memory) if memory else None,
        importance=parse_importance(metrics), last_update=max(stamps) / 1000 if stamps else None,
    )


def _analyses(runs: list, trials: list[Trial]) -> list[Analysis]:
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


# --- the selection → a Comparison -------------------------------------------------------------------


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text)[:80] or "compare"


def _select(c, runs: list[str], experiment: str | None) -> tuple[list, list[tuple[Any, Any]]]:
    """(sweep parent runs, [(run, its parent or None)]) of the selection."""
    exp_ids = _experiment_ids(c, experiment)
    parents: list = []
    pairs: list[tuple[Any, Any]] = []
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
    return parents, pairs


def collect(uri: str, runs: Iterable[str] = (), experiment: str | None = None, metric: str | None = None,
            mode: str | None = None) -> Comparison:
    """Read the selected sweeps / experiment from MLflow and build the ranked comparison.

    ``metric`` / ``mode`` default to the first sweep's own objective, else eval_loss (min).
    """
    c = tracking.client(uri)
    runs = list(runs)
    if not runs and not experiment:
        raise ValueError("choose what to compare: --run SWEEP (parent run id or name, repeatable) or "
                         "--experiment NAME; " + _sweep_hint(c, _experiment_ids(c, None)))
    parents, pairs = _select(c, runs, experiment)
    if metric is None or mode is None:
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
    analyses = _analyses(_search(c, trial_exps, "tags.kind = 'analysis'"), trials) if trial_exps else []
    cmp = build_comparison(trials, uri=uri, metric=metric, mode=mode, label=_slug(label or "compare"), sweeps=sweeps)
    cmp.analyses = analyses
    return cmp
