"""`freezetune train CONFIG.yaml`: one fine-tuning run on Ray Train, logged to MLflow.

Order matters: everything cheap that can be wrong is checked first (``preflight``: config, MLflow
reachability, model, strategy against the model on the meta device, data), then Ray starts and the
TorchTrainer's workers run ``pipelines.training``.
"""

from __future__ import annotations

import json
import logging
import os

import matplotlib.pyplot as plt

from pipelines import tracking
from pipelines.config.paths import is_uri, storage_root
from pipelines.config.run import RunConfig
from pipelines.data import storage as storage_fs
from pipelines.jobs import ray_env
from pipelines.jobs.callbacks import TrainEpochLogger
from pipelines.jobs.importance import log_trial_importance, trial_importance
from pipelines.jobs.preflight import Prepared, check_cluster_reach, default_run_name, fresh_name, prepare
from pipelines.jobs.model_logging import log_trained_model
from pipelines.jobs.trainer import make_trainer
from pipelines.reporting.lr_plot import lr_schedule_figure
from pipelines.reporting.plan_view import render_plan
from pipelines.tracking import MlflowRun
from pipelines.training import checkpoints
from strategies.plan import stage_steps

log = logging.getLogger("freezetune.train")

RUN_KEY_TAG = "freezetune.run_key"  # how a resumed run finds its MLflow run


def log_run_start(prep: Prepared, run: MlflowRun) -> None:
    """Params, tags, the plan table and the LR-schedule plot."""
    cfg, s = prep.cfg, prep.plan_summary
    run.log_params({**tracking.flatten(cfg.to_dict()), "model_path": prep.model_path,
                    "data.n_train": prep.n_train, "data.n_eval": prep.n_eval})
    run.set_tags({
        "strategy": s["strategy"], "model": cfg.model, "vlm_strategy_id": s.get("letter") or "",
        "parts_trained": ",".join(p for p, v in s["parts"].items() if v["trainable"]),
        "trainable_params": s["trainable_params"], "trainable_share": f"{s['trainable_share']:.4f}",
    })
    run.log_text(render_plan(s), "plan/plan.txt")
    run.log_dict(s, "plan/plan.json")
    run.log_table(s["param_groups"], "plan/param_groups.json")
    for context, source, records in (("train", cfg.data.train, prep.n_train), ("eval", cfg.data.eval, prep.n_eval)):
        if source:  # without data.eval the eval set is split off train: one dataset
            run.log_dataset(source, name=os.path.basename(source), context=context, records=records)
    fig = lr_schedule_figure(s["param_groups"], prep.steps_per_epoch, cfg.train.epochs, cfg.train.schedule,
                             s.get("stages"), title=f"LR schedule: {s['strategy']} on {cfg.model}",
                             stage_steps=stage_steps(cfg.strategy.thaw_every, prep.steps_per_epoch * cfg.train.epochs))
    run.log_figure(fig, "plots/lr_schedule.png")
    plt.close(fig)


def best_checkpoint_tags(result, storage: str) -> dict:
    """The epoch checkpoint with the lowest eval_loss (kept by the trainer's checkpoint score), as tags."""
    scored = [(m.get("eval_loss"), m.get("epoch"), c) for c, m in (result.best_checkpoints or [])]
    scored = [s for s in scored if isinstance(s[0], float) and s[0] == s[0]]  # NaN: no eval data, no best
    if not scored:
        return {}
    loss, epoch, best = min(scored, key=lambda s: s[0])
    return {"best_checkpoint": storage_fs.uri_of(storage, best.path), "best_epoch": epoch}


def persisted_epochs(run_dir: str) -> list[tuple[int, dict, str]]:
    """(epoch, metrics, checkpoint) of every checkpoint Ray kept in the run's folder (its meta.json)."""
    found = []
    for ckpt in storage_fs.list_dirs(run_dir):
        meta = storage_fs.join(ckpt, checkpoints.META)
        if os.path.basename(ckpt.rstrip("/")).startswith("checkpoint_") and storage_fs.is_file(meta):
            data = json.loads(storage_fs.read_bytes(meta))
            found.append((int(data["epoch"]), data.get("metrics") or {}, ckpt))
    return found


def run_training(cfg: RunConfig, address: str | None = None, resume: bool = False) -> dict:
    """Run one fine-tuning; returns {run_id, run_name, metrics, checkpoint}. The MLflow run always ends."""
    uri = cfg.tracking_uri
    storage = cfg.resolved_storage_path
    base_name = cfg.name or default_run_name(cfg)
    run_name = base_name if resume else fresh_name(storage, base_name)
    run_dir = storage_fs.join(storage, run_name)  # a folder, or s3://bucket/runs/<name>: Ray's run folder
    if resume and not storage_fs.is_dir(run_dir):
        raise ValueError(f"--resume: nothing to resume at {run_dir} (no run of this name was started "
                         "there); run without --resume to start it, or set `name:` to the run to resume.")
    prep = prepare(cfg)

    ray_env.connect(address)
    ray_env.leave_job_working_dir(storage if not is_uri(storage) else storage_root())  # a local folder to work in
    res = cfg.resources
    ray_env.check_capacity(res.num_workers, res.per_worker())
    check_cluster_reach(cfg, prep.model_path)

    run = MlflowRun.start_or_resume(uri, cfg.mlflow.experiment, run_name, RUN_KEY_TAG, run_dir, resume=resume)
    if run.resumed:
        log.info("resuming MLflow run %s (%s)", run.run_id, run_name)
    with run:
        log_run_start(prep, run)
        epochs_logger = TrainEpochLogger(uri, run.run_id, storage)
        if run.resumed:
            epochs_logger.backfill(persisted_epochs(run_dir))
        trainer = make_trainer(cfg, prep.model_path, run_name, [epochs_logger], storage, run_id=run.run_id)
        # importance files are written and read as local files: beside the run, or in a local folder of that name
        local_run_dir = run_dir if not is_uri(storage) else os.path.join(storage_root(), run_name)
        when, analysis_dir = cfg.analysis.importance, os.path.join(local_run_dir, "importance")
        if when in ("before", "both"):
            trial_importance(cfg, prep.model_path, "before", analysis_dir)
        log.info("training %s: %d workers, %d optimizer steps per epoch, %d epochs", run_name, res.num_workers,
                 prep.steps_per_epoch, cfg.train.epochs)
        result = trainer.fit()
        # Ray's Checkpoint.path is a path on the storage's filesystem: as a URI (s3://...) when storage is one
        checkpoint = storage_fs.uri_of(storage, result.checkpoint.path) if result.checkpoint else None
        if when in ("after", "both") and checkpoint:
            with result.checkpoint.as_directory() as local_checkpoint:  # itself when local, else a download
                trial_importance(cfg, prep.model_path, "after", analysis_dir, checkpoint=local_checkpoint)
        if when:
            log_trial_importance(uri, run.run_id, analysis_dir)
        if checkpoint:
            final_model = storage_fs.join(checkpoint, "final_model") if cfg.train.save != "none" else ""
            run.set_tags({"checkpoint": checkpoint, "final_model": final_model, **best_checkpoint_tags(result, storage)})
            log_trained_model(cfg, uri, run.run_id, result.checkpoint, checkpoint, base_model=prep.model_path)
        return {"run_id": run.run_id, "run_name": run_name, "checkpoint": checkpoint,
                "metrics": tracking.client(uri).get_run(run.run_id).data.metrics, "tracking_uri": uri}
