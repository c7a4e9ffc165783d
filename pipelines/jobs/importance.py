"""Layer importance as Ray work, logged to MLflow, and the rankings that feed ``importance_top_k``.

The measurement (``training.analysis``) runs as one Ray task (``num_gpus`` when ``resources.use_gpu``);
the driver alone writes MLflow: per-block metrics ``importance/<measure>/<unit>``,
``importance/table.{csv,md}``, ``importance/ranking.json`` and ``importance/importance.png``.

``strategy.importance_from`` (an analysis run id, a ranking JSON file or ``auto``) +
``strategy.importance_measure`` → ``resolve_importance`` → ``strategy.importance`` ({unit: score}).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import ray
import torch
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from pipelines import tracking
from pipelines.config import paths
from pipelines.config.analysis import MEASURES, AnalysisSettings, ImportanceError
from pipelines.config.loading import from_dict
from pipelines.config.run import RunConfig
from pipelines.jobs.sources import resolve_model
from pipelines.reporting.importance_plots import importance_figure
from pipelines.reporting.importance_tables import table_csv, table_markdown
from pipelines.training.analysis import analyze_model
from pipelines.training.importance import ImportanceResult

log = logging.getLogger("freezetune.importance")

ARTIFACT_DIR = "importance"
RANKING_FILE = "ranking.json"
RUN_ID = re.compile(r"[0-9a-f]{32}")


def _analysis_task(payload: dict) -> dict:
    """The Ray task: one worker, the model and the sample, the result back as a plain dict."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(payload["threads"])
    cfg = from_dict(RunConfig, payload["run"], "run")
    settings = AnalysisSettings(**payload["analysis"])
    device = "cuda" if payload["gpus"] and torch.cuda.is_available() else "cpu"
    return analyze_model(cfg, settings, payload["model_path"], payload["weights"], device).to_dict()


def task_resources(cfg: RunConfig) -> dict[str, Any]:
    """One worker's resources, as a trial's worker gets them."""
    per_worker = cfg.resources.per_worker()
    custom = {k: v for k, v in per_worker.items() if k not in ("CPU", "GPU")}
    return {"num_cpus": per_worker["CPU"], "num_gpus": per_worker.get("GPU", 0), "resources": custom or None}


def run_on_ray(cfg: RunConfig, settings: AnalysisSettings, model_path: str, weights: str | None) -> ImportanceResult:
    """The measurement as a single Ray task (Ray must be connected); blocks until it is done."""
    resources = task_resources(cfg)
    payload = {"run": cfg.to_dict(), "analysis": dataclasses.asdict(settings), "model_path": model_path,
               "weights": weights, "gpus": resources["num_gpus"], "threads": max(1, int(resources["num_cpus"]))}
    # inside a Tune trial the task would be captured by the trial's placement group (no CPU) and never
    # fit: it asks the cluster for a worker of its own instead
    outside = PlacementGroupSchedulingStrategy(placement_group=None)
    task = ray.remote(_analysis_task).options(name="freezetune-analyze", max_retries=0, scheduling_strategy=outside,
                                              **resources)
    return ImportanceResult.from_dict(ray.get(task.remote(payload)))


def log_importance(uri: str, run_id: str, result: ImportanceResult, prefix: str = "importance",
                   artifact_dir: str = ARTIFACT_DIR, title: str | None = None,
                   baseline: ImportanceResult | None = None) -> None:
    """Per-block metrics ``<prefix>/<measure>/<unit>``, cost metrics, the table, ranking and plot."""
    metrics = {f"{prefix}/{m}/{u}": v for m, scores in result.scores.items() for u, v in scores.items()}
    metrics[f"{prefix}/base_loss"] = result.base_loss
    metrics.update({f"{prefix}/cost/{k}": v for k, v in result.cost.items()})
    tracking.log_metrics(uri, run_id, metrics, step=0)
    tracking.set_tags(uri, run_id, {**{f"{prefix}.top.{m}": result.ranking(m)[0] for m in result.measures},
                                    **({f"{prefix}.notes": "; ".join(result.notes)} if result.notes else {})})
    tracking.log_text(uri, run_id, table_csv(result), f"{artifact_dir}/table.csv")
    tracking.log_text(uri, run_id, table_markdown(result), f"{artifact_dir}/table.md")
    tracking.log_dict(uri, run_id, result.to_dict(), f"{artifact_dir}/{RANKING_FILE}")
    fig = importance_figure(result, title=title)
    tracking.log_figure(uri, run_id, fig, f"{artifact_dir}/importance.png")
    plt.close(fig)
    if baseline is not None:
        fig = importance_figure(result, title=f"Layer importance before vs after fine-tuning: {result.model}",
                                baseline=baseline)
        tracking.log_figure(uri, run_id, fig, f"{artifact_dir}/shift.png")
        plt.close(fig)


# --- the ranking, for importance_top_k ---------------------------------------------------


def resolve_importance(source: str, measure: str = "ablation", *, tracking_uri: str | None = None,
                       cfg: RunConfig | None = None, model_path: str | None = None) -> dict[str, float]:
    """``{unit: score}`` for ``importance_top_k`` from ``strategy.importance_from`` + ``importance_measure``.

    ``source``: an MLflow run id of `freezetune analyze` (its ``importance/ranking.json``; a trial analysed
    before/after fine-tuning: the ``after`` ranking, else ``before``), a ranking JSON file, or ``auto``:
    computed now on ``cfg``'s base model and eval data, cached on disk under ``cfg.cache_dir``.
    """
    if measure not in MEASURES:
        raise ImportanceError(f"strategy.importance_measure = {measure!r}: use one of {', '.join(MEASURES)}.")
    source = str(source).strip()
    if source == "auto":
        if cfg is None:
            raise ImportanceError("strategy.importance_from = auto needs the run config (model and data) to compute "
                                  "the ranking; pass cfg=.")
        data = _auto_ranking(cfg, model_path)
    elif source.endswith(".json") or os.path.isfile(os.path.expanduser(source)):
        path = Path(os.path.expanduser(source))
        if not path.is_file():
            raise ImportanceError(f"strategy.importance_from = {source!r}: no such file; give the ranking.json "
                                  "artifact of a `freezetune analyze` run (or its run id).")
        data = json.loads(path.read_text())
    elif RUN_ID.fullmatch(source):
        uri = tracking_uri or (cfg.tracking_uri if cfg else paths.tracking_uri())
        data = _ranking_from_run(source, uri)
    else:
        raise ImportanceError(f"strategy.importance_from = {source!r}: use the MLflow run id of a `freezetune analyze` "
                              "run (32 hex characters), a ranking JSON file, or `auto` (computed on the base model).")
    if "scores" not in data and data and all(isinstance(v, (int, float)) for v in data.values()):
        return {str(u): float(v) for u, v in data.items()}  # a plain {unit: score} file
    scores = data.get("scores", {}).get(measure)
    if not scores:
        raise ImportanceError(f"strategy.importance_measure = {measure!r}: {source} holds only "
                              f"{sorted(data.get('scores', {}))}; choose one of those, or re-run `freezetune analyze` "
                              f"with {measure} in analysis.measures.")
    return {u: float(v) for u, v in scores.items() if v == v}  # NaN (no tokens) ranks nowhere


@functools.lru_cache(maxsize=32)
def _ranking_from_run(run_id: str, uri: str) -> dict:
    c = tracking.client(uri)
    try:
        c.get_run(run_id)
    except Exception as err:
        raise ImportanceError(f"strategy.importance_from = {run_id!r}: no such run in {uri} ({type(err).__name__}); "
                              "check mlflow.tracking_uri.") from None
    with tempfile.TemporaryDirectory(prefix="freezetune-ranking-") as tmp:
        for artifact in (f"{ARTIFACT_DIR}/{RANKING_FILE}", f"{ARTIFACT_DIR}/after/{RANKING_FILE}",
                         f"{ARTIFACT_DIR}/before/{RANKING_FILE}"):
            try:
                local = c.download_artifacts(run_id, artifact, tmp)
            except Exception:  # not there: try the next place
                continue
            return json.loads(Path(local).read_text())
    raise ImportanceError(f"strategy.importance_from = {run_id!r}: the run holds no {ARTIFACT_DIR}/{RANKING_FILE}; "
                          "give the run id of a `freezetune analyze` run.")


def _auto_ranking(cfg: RunConfig, model_path: str | None) -> dict:
    """All measures on the base model, once per (model, data, settings): a disk cache every process reads."""
    model_path = model_path or resolve_model(cfg)
    settings = dataclasses.replace(cfg.analysis, measures=list(MEASURES), checkpoint=None, run_id=None)
    path = _base_cache_file(cfg, model_path, settings)
    if path.is_file():
        return json.loads(path.read_text())
    log.info("strategy.importance_from = auto: measuring layer importance of %s in this process", cfg.model)
    data = analyze_model(cfg, settings, model_path).to_dict()
    _write_atomic(path, data)
    return data


def _base_cache_file(cfg: RunConfig, model_path: str, settings: AnalysisSettings) -> Path:
    """Where the base model's result for these data and settings is kept (the same for every trial of a sweep)."""
    key = hashlib.sha256(json.dumps([model_path, dataclasses.asdict(cfg.data), cfg.seed, cfg.train.precision,
                                     settings.max_batches, settings.batch_size or cfg.train.batch_size,
                                     settings.grad_batches, sorted(settings.sides), sorted(settings.measures)],
                                    sort_keys=True).encode()).hexdigest()[:20]
    return Path(cfg.resolved_cache_dir) / "importance" / f"{key}.json"


def _write_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh)
    os.replace(tmp, path)  # atomic: a concurrent reader sees all or nothing


def apply_importance(cfg: RunConfig, model_path: str | None = None) -> bool:
    """Fill ``cfg.strategy.importance`` from ``strategy.importance_from`` for ``importance_top_k``; True if filled.

    An explicit ``strategy.importance`` wins; other strategies ignore the source (nothing is computed).
    """
    source = getattr(cfg.strategy, "importance_from", None)
    if not source or cfg.strategy.name != "importance_top_k" or cfg.strategy.importance:
        return False
    measure = getattr(cfg.strategy, "importance_measure", None) or "ablation"
    cfg.strategy.importance = resolve_importance(source, measure, tracking_uri=cfg.tracking_uri, cfg=cfg,
                                                 model_path=model_path)
    return True


# --- before/after fine-tuning, in a trial or a training run --------------------------------


def trial_importance(cfg: RunConfig, model_path: str, when: str, out_dir: str | Path,
                     checkpoint: str | None = None) -> Path:
    """Measure the trial's model ``before`` fine-tuning (base) or ``after`` (``checkpoint``) as a Ray task and
    write ``out_dir/importance_<when>.json`` for the MLflow writer (``log_trial_importance``)."""
    if when not in ("before", "after"):
        raise ImportanceError(f"when = {when!r}: use before or after.")
    if when == "after" and not checkpoint:
        raise ImportanceError("importance after fine-tuning needs the run's checkpoint (train.save or a finished run).")
    settings = dataclasses.replace(cfg.analysis, checkpoint=None, run_id=None, progress=False)
    path = Path(out_dir) / f"importance_{when}.json"
    cached = _base_cache_file(cfg, model_path, settings) if when == "before" else None
    if cached is not None and cached.is_file():  # every trial of a sweep starts from the same base model
        data = json.loads(cached.read_text())
    else:
        data = run_on_ray(cfg, settings, model_path, checkpoint if when == "after" else None).to_dict()
        if cached is not None:
            _write_atomic(cached, data)
    _write_atomic(path, data)
    return path


def log_trial_importance(uri: str, run_id: str, out_dir: str | Path) -> list[str]:
    """Log what ``trial_importance`` wrote: ``importance_before/...`` and ``importance_after/...`` metrics,
    ``importance/{before,after}/`` artifacts, and the shift plot when both exist. Returns the phases logged."""
    found = {}
    for when in ("before", "after"):
        path = Path(out_dir) / f"importance_{when}.json"
        if path.is_file():
            found[when] = ImportanceResult.from_dict(json.loads(path.read_text()))
    for when, result in found.items():
        baseline = found.get("before") if when == "after" else None
        log_importance(uri, run_id, result, prefix=f"importance_{when}", artifact_dir=f"{ARTIFACT_DIR}/{when}",
                       title=f"Layer importance {when} fine-tuning: {result.model}", baseline=baseline)
    return list(found)

