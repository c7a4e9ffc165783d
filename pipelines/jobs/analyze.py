"""`freezetune analyze CONFIG.yaml`: layer importance of a model on its data, as a Ray job, logged to MLflow.

The config is a run config (model, data, resources, mlflow: the same keys as `freezetune train`) plus an
``analysis:`` section (``importance.AnalysisSettings``)::
    model: tiny-llava
    data: {train: data/train.jsonl, eval: data/eval.jsonl, max_length: 64}
    resources: {use_gpu: true}                 # one worker: cpus_per_worker / a GPU, like a trial's worker
    analysis:
      max_batches: 8                           # the bounded eval sample
      grad_batches: 4
      measures: [ablation, influence, grad_norm, fisher]
      run_id: 0123abcd...                      # optional: a fine-tuned model (`freezetune train` run), or
      # checkpoint: runs/NAME/checkpoint_000002 #   its checkpoint / final_model folder

The measurement runs as one Ray task (``num_gpus`` when ``resources.use_gpu``); the driver alone writes
MLflow: params, per-block metrics ``importance/<measure>/<unit>``, ``importance/table.{csv,md}``,
``importance/ranking.json`` and ``importance/importance.png``.

The ranking feeds the ``importance_top_k`` strategy: ``strategy.importance_from`` (an analysis run id,
a ranking JSON file or ``auto``) + ``strategy.importance_measure`` → ``resolve_importance`` →
``strategy.importance`` ({unit: score}).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

from pipelines import tracking
from pipelines.config.analysis import AnalysisSettings, ImportanceError
from pipelines.config.run import RunConfig, load_run_config
from pipelines.data.dataset import load_datasets
from pipelines.jobs import ray_env
from pipelines.jobs.importance import log_importance, run_on_ray, task_resources
from pipelines.jobs.preflight import default_run_name
from pipelines.jobs.sources import resolve_data_sources, resolve_model
from pipelines.models.loading import load_processor
from pipelines.tracking import MlflowRun

log = logging.getLogger("freezetune.analyze")


def load_analysis_config(path: str | Path, overrides: dict | None = None) -> tuple[RunConfig, AnalysisSettings]:
    """A run config YAML with an ``analysis:`` section; relative paths are relative to the file."""
    cfg = load_run_config(path, overrides)
    settings = cfg.analysis
    if settings.checkpoint and not os.path.isabs(os.path.expanduser(settings.checkpoint)):
        settings.checkpoint = str((Path(path).parent / settings.checkpoint).absolute())
    return cfg, settings


def resolve_weights(cfg: RunConfig, settings: AnalysisSettings) -> tuple[str | None, str]:
    """(folder of fine-tuned weights or None, a description for MLflow). Run ids are looked up on the driver."""
    if settings.checkpoint:
        folder = Path(os.path.expanduser(settings.checkpoint))
        if not folder.is_dir():
            raise ImportanceError(f"analysis.checkpoint = {settings.checkpoint!r}: no such folder; give a checkpoint "
                                  "or final_model folder written by `freezetune train`.")
        return str(folder), f"checkpoint {folder}"
    if settings.run_id:
        try:
            tags = tracking.client(cfg.tracking_uri).get_run(settings.run_id).data.tags
        except Exception as err:  # mlflow raises MlflowException for an unknown id
            raise ImportanceError(f"analysis.run_id = {settings.run_id!r}: not found in the MLflow store "
                                  f"{cfg.tracking_uri} ({type(err).__name__}); check mlflow.tracking_uri.") from None
        folder = tags.get("final_model") or tags.get("checkpoint")
        if not folder:
            raise ImportanceError(f"analysis.run_id = {settings.run_id!r}: the run has no `final_model`/`checkpoint` "
                                  "tag; give a finished `freezetune train` run, or analysis.checkpoint.")
        return folder, f"run {settings.run_id} ({folder})"
    return None, "base model"


def run_analysis(cfg: RunConfig, settings: AnalysisSettings, address: str | None = None) -> dict:
    """The job: checks on the driver, the measurement on Ray, everything logged from the driver.

    Returns {run_id, run_name, tracking_uri, result}. The MLflow run always ends.
    """
    settings.validate()
    uri = cfg.tracking_uri
    tracking.check_tracking_uri(uri)
    resolve_data_sources(cfg)
    model_path = resolve_model(cfg)
    weights, source = resolve_weights(cfg, settings)
    # tokenise on the driver: bad data fails here in seconds, and the task reads the cache
    _, eval_set = load_datasets(cfg.data, load_processor(model_path, trust_remote_code=cfg.trust_remote_code),
                                seed=cfg.seed, loss_on=cfg.train.loss_on)
    if not eval_set:
        raise ImportanceError("data: no held-out examples (data.eval unset and data.eval_fraction = 0); give "
                              "data.eval or an eval_fraction > 0.")
    ray_env.connect(address)
    ray_env.check_capacity(1, cfg.resources.per_worker())
    run_name = cfg.name or default_run_name(cfg, kind="importance", extra=source)
    tags = {"kind": "analysis", "model": cfg.model, "analysed": source,
            **({"source_run_id": settings.run_id} if settings.run_id else {})}
    with MlflowRun.start(uri, cfg.mlflow.experiment, run_name, tags=tags) as run:
        params = tracking.flatten({"analysis": {k: v for k, v in dataclasses.asdict(settings).items()
                                                if k not in ("importance", "progress")},
                                   "data": dataclasses.asdict(cfg.data), "resources": task_resources(cfg)})
        run.log_params({**params, "model": cfg.model, "model_path": model_path, "seed": cfg.seed,
                        "weights": weights or "", "data.n_eval": len(eval_set), "precision": cfg.train.precision})
        log.info("layer importance of %s (%s): %d batches on Ray", cfg.model, source, settings.max_batches)
        result = run_on_ray(cfg, settings, model_path, weights)
        log_importance(uri, run.run_id, result, title=f"Layer importance: {result.model} ({source})")
        return {"run_id": run.run_id, "run_name": run_name, "tracking_uri": uri, "result": result}
