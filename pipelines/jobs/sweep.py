"""`freezetune sweep tune_spaces/NAME.yaml`: Ray Tune over strategies and per-part learning rates.

Each trial is a Tune function that builds and fits a TorchTrainer (Train V2);
the workers' reports (every ``train.report_every`` steps and at epoch ends) reach Tune through
``TuneReportCallback`` so ASHA can stop a trial early. MLflow is written by the Tune driver only: the
sweep is one parent run, each trial exactly one child run.

Before anything starts, every trial's config is built and checked against the
model (on the meta device), so a bad space fails in seconds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile
from pathlib import Path

from optuna.samplers import TPESampler
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator
from ray.tune.search.optuna import OptunaSearch

from pipelines import tracking
from pipelines.config.paths import is_uri, storage_root
from pipelines.data import storage as storage_fs
from pipelines.jobs import ray_env
from pipelines.jobs.callbacks import SweepMlflowCallback
from pipelines.jobs.importance import trial_importance
from pipelines.jobs.preflight import check_cluster_reach, fresh_name, prepare
from pipelines.jobs.sweep_plan import (SWEEP_KEY_TAG, TRIAL_KEY_TAG, SweepPlan, build_sweep_plan, describe,
                                       size_for_cluster, sized_config, trial_config, trial_settings)
from pipelines.jobs.trainer import make_trainer
from pipelines.jobs.trial_sizing import apply_size
from pipelines.reporting.mlflow_reader import collect
from pipelines.reporting.render import render_text
from pipelines.tracking import MlflowRun
from pipelines.tracking.models import register_model
from tune_spaces.spec import SweepSpec, define_by_run

log = logging.getLogger("freezetune.sweep")
# A trial's driver (the Tune function that runs its TorchTrainer) on the head node, and no CPU: it only waits on
# its workers. Even a sliver of a CPU kept two 1-CPU trials from training side by side on a 2-CPU node (2 x 1.05 > 2),
# so `max_concurrent_trials: 2` ran one trial at a time there, the other's workers waiting for the first to end.
TRIAL_DRIVER = {ray_env.HEAD_RESOURCE: 0.001}


def run_trial(config: dict, plan: SweepPlan, model_path: str, sweep_dir: str) -> None:
    """One Tune trial = one TorchTrainer, named after the trial so a restarted trial finds its checkpoints."""
    trials_storage = storage_fs.join(sweep_dir, "trials")
    overrides, seed_index = trial_settings(config, plan.configs)
    trial_id = tune.get_context().get_trial_id()
    cfg = sized_config(plan, trial_config(plan, overrides, seed_index), config.get("config_index"), model_path, trial_id)
    # importance files are local files (pipelines.jobs.importance): with a URI storage, under the local runs folder
    local_trials = (trials_storage if not is_uri(trials_storage) else
                    os.path.join(storage_root(), *storage_fs.filesystem(trials_storage)[1].split("/")[-2:]))
    when, trial_dir = cfg.analysis.importance, os.path.join(local_trials, trial_id)
    if when in ("before", "both"):
        trial_importance(cfg, model_path, "before", trial_dir)
    # the trial's MLflow run (the driver's callback creates it): found by the key the callback tags it with
    run_key = (cfg.mlflow.experiment, TRIAL_KEY_TAG, storage_fs.join(sweep_dir, trial_id))
    result = make_trainer(cfg, model_path, trial_id, [TuneReportCallback()], trials_storage,
                          score=(plan.spec.sweep.metric, plan.spec.sweep.mode), run_key=run_key).fit()
    if when in ("after", "both") and result.checkpoint is not None:
        trial_importance(cfg, model_path, "after", trial_dir, checkpoint=result.checkpoint.path)


# --- the sweep ----------------------------------------------------------------------


def run_sweep(path: str | Path, address: str | None = None, resume: bool = False, dry_run: bool = False,
              overrides: dict | None = None) -> dict:
    path = Path(path).absolute()  # ray.init inside a job may change the working directory
    plan = build_sweep_plan(path, overrides)
    if plan.spec.sweep.gpu_memory_gb == "auto" and (not dry_run or address or os.environ.get("RAY_ADDRESS")):
        ray_env.connect(address)  # before any tokenising: a trial no GPU type of the cluster holds is refused first
        size_for_cluster(plan, ray_env.cluster_gpu_types())
    print(describe(plan), flush=True)
    if dry_run:
        return {"dry_run": True, "trials": plan.num_trials}

    spec, base = plan.spec, plan.base
    if spec.sweep.register_as and base.train.model_to_log == "none":
        raise ValueError(f"{path}: sweep.register_as = {spec.sweep.register_as!r} registers the best trial's logged "
                         "model, but base.train logs none (train.log_model / train.save: none); set base.train.save "
                         "to adapter or merged, or remove sweep.register_as.")
    prep = prepare(base)  # tracking reachable, model resolved, data tokenised once for every trial
    if prep.n_eval == 0 and spec.sweep.metric.startswith("eval_"):
        raise ValueError(f"{path}: sweep.metric = {spec.sweep.metric}, but base has no eval data (data.eval_fraction "
                         "= 0 and no data.eval), so no trial could be ranked; give base.data.eval or set "
                         "base.data.eval_fraction > 0.")
    uri, storage = base.tracking_uri, base.resolved_storage_path
    name = spec.name if resume else fresh_name(storage, spec.name)
    sweep_dir = storage_fs.join(storage, name)  # a folder, or s3://bucket/runs/<name> (its query kept last)
    if resume and not tune.Tuner.can_restore(sweep_dir):
        raise ValueError(f"--resume: no sweep to resume at {sweep_dir}; run without --resume to start it.")

    ray_env.connect(address)
    ray_env.leave_job_working_dir(storage if not is_uri(storage) else storage_root())  # a local folder to work in
    shapes = {(base.resources.num_workers, tuple(base.resources.per_worker().items()))}
    if plan.sizes:  # each sized trial must fit the cluster (or a node type it can scale to)
        shapes = {(z.workers, tuple(apply_size(base, z, spec.sweep.gpu_resource).resources.per_worker().items()))
                  for z in plan.sizes}
    for workers, per_worker in sorted(shapes):
        ray_env.check_capacity(workers, dict(per_worker), head_reserved=TRIAL_DRIVER)
    check_cluster_reach(base, prep.model_path)

    parent = MlflowRun.start_or_resume(uri, base.mlflow.experiment, name, SWEEP_KEY_TAG, sweep_dir, resume=resume,
                                       tags={"kind": "sweep"})
    with parent:  # ends FINISHED, KILLED, or FAILED with the error, whatever happens from here on
        if not parent.resumed:
            log_sweep_start(parent, plan, path, overrides)
        callback = SweepMlflowCallback(uri, base.mlflow.experiment, parent.run_id, sweep_dir, plan, base.train.epochs)
        outbox = storage_fs.join(sweep_dir, "mlflow_outbox.json")
        if resume and storage_fs.is_file(outbox):
            with _local_copy(outbox, read=True) as kept:
                callback.replay(kept)
            storage_fs.remove(outbox)
        # The trial function only drives; its TorchTrainer's workers hold the real resources. It takes no CPU
        # (TRIAL_DRIVER) and lives on the head node, so its process (imports, memory) stays off the worker nodes.
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, plan=plan, model_path=prep.model_path, sweep_dir=sweep_dir),
            tune.PlacementGroupFactory([TRIAL_DRIVER]),
        )
        if resume:
            log.info("resuming sweep %s from %s", name, sweep_dir)
            tuner = tune.Tuner.restore(sweep_dir, trainable=trainable, resume_unfinished=True, resume_errored=True)
        else:
            tuner = tune.Tuner(trainable, param_space=_param_space(plan), tune_config=_tune_config(plan),
                               run_config=tune.RunConfig(name=name, storage_path=storage, callbacks=[callback],
                                                         verbose=1))
        grid = tuner.fit()
        writer = _mlflow_writer(tuner, callback)
        undelivered = writer.flush()
        if undelivered:
            with _local_copy(outbox) as kept:
                writer.dump(kept)
            raise tracking.TrackingError(
                f"the sweep finished but MLflow ({tracking.redact(uri)}) stayed unreachable: {undelivered} write(s) "
                f"are kept in {outbox}. Bring MLflow back and run `freezetune sweep {path} --resume`: it delivers "
                "them first (no trial is rerun).")
        summary = summarize(uri, parent.run_id, spec.sweep.metric, spec.sweep.mode)
        print("\n" + summary["text"], flush=True)
        log_sweep_summary(parent, summary, spec.sweep.metric)
        if spec.sweep.register_as:
            register_best(uri, parent, summary, spec.sweep.register_as, name)
        return {"parent_run_id": parent.run_id, "name": name, "rows": summary["rows"], "errors": len(grid.errors),
                "tracking_uri": uri}


@contextlib.contextmanager
def _local_copy(path: str, read: bool = False):
    """``path`` itself when local; for a URI a local temp file, filled from it (``read``) or uploaded to it."""
    if not is_uri(path):
        yield path
        return
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, os.path.basename(storage_fs.filesystem(path)[1]))
        if read:
            with open(local, "wb") as f:
                f.write(storage_fs.read_bytes(path))
        yield local
        if not read:
            with open(local, "rb") as f:
                storage_fs.write_bytes(path, f.read())


def log_sweep_start(parent: MlflowRun, plan: SweepPlan, path: Path, overrides: dict | None) -> None:
    """The parent run's settings, the space file as written and as drawn."""
    parent.log_params({**tracking.flatten({"sweep": _settings_dict(plan.spec)}), "model": plan.base.model,
                       "trials": plan.num_trials})
    parent.log_text(Path(path).read_text(), f"space/{Path(path).name}")
    if overrides:
        parent.log_dict(overrides, "space/overrides.json")
    parent.log_text(describe(plan), "space/space.txt")


def log_sweep_summary(parent: MlflowRun, summary: dict, metric: str) -> None:
    """The ranked trials, and the best one's settings and score."""
    parent.log_text(summary["text"], "summary/ranked.txt")
    parent.log_dict(summary["rows"], "summary/ranked.json")
    if summary["rows"]:  # the same rows as an MLflow table: sortable in the UI, one column per searched setting
        parent.log_table([{**{k: v for k, v in r.items() if k != "params"}, **r["params"]} for r in summary["rows"]],
                         "summary/ranked_table.json")
    top = summary["rows"][0] if summary["rows"] else None
    best = top if top and top["outcome"] != "failed" and top.get("rank") is not None else None
    if best:
        parent.set_tags({"best_trial": best["trial_id"], "best_run_id": best["run_id"], f"best_{metric}": best["best"]})
        parent.log_params({f"best.{k}": v for k, v in best["params"].items()})
        parent.log_metrics({f"best_{metric}": best["best"]}, step=0)


def register_best(uri: str, parent: MlflowRun, summary: dict, registered_name: str, sweep_name: str) -> None:
    """`sweep.register_as`: the best ranked trial's logged model as a new registry version (or why not)."""
    best = next((r for r in summary["rows"] if r.get("rank") is not None and r["outcome"] != "failed"), None)
    if best is None:
        log.warning("sweep.register_as = %s: no trial was ranked; nothing registered", registered_name)
        parent.set_tags({"registered_model": "none: no trial was ranked"})
        return
    try:
        reg = register_model(uri, best["run_id"], registered_name, tags={"sweep": sweep_name, "trial_id": best["trial_id"]},
                             description=f"best trial {best['trial_id']} of sweep {sweep_name}")
    except tracking.TrackingError as err:  # e.g. the best trial's model was over train.log_model_max_gb
        log.warning("sweep.register_as = %s: %s", registered_name, err)
        parent.set_tags({"registered_model": f"failed: {err}"})
        return
    log.info("registered the best trial's model as %s", reg["model_uri"])
    parent.set_tags({"registered_model": f"{reg['name']}/{reg['version']}"})


def _mlflow_writer(tuner, fallback):
    """The callback instance Tune actually used (a restored Tuner carries its own unpickled copy)."""
    try:
        callbacks = tuner._local_tuner.get_run_config().callbacks or []
    except AttributeError:
        callbacks = []
    return next((c for c in callbacks if isinstance(c, SweepMlflowCallback)), fallback)


def _settings_dict(spec: SweepSpec) -> dict:
    return dataclasses.asdict(spec.sweep)


# a value Tune's live table shows for a setting a trial does not have (e.g. vision_lr when the vision tower is frozen)
NOT_SAMPLED = "-"


def _param_space(plan: SweepPlan) -> dict:
    """Random search: the configurations are drawn before the sweep starts (plan.configs); Tune runs them as
    given (``_drawn_points``) under each seed. Every setting is a ``tune.choice`` over its drawn values only so
    that Tune's live table has a column for it (it shows Domain and grid keys, nothing else); the trial reads
    only ``config_index`` and ``seed_index``."""
    if plan.spec.sweep.search == "optuna":
        return {}
    configs = plan.configs
    shown = {key: tune.choice(list(dict.fromkeys(_shown(c.get(key, NOT_SAMPLED)) for c in configs)))
             for key in _keys(configs)}
    return {"config_index": tune.choice(list(range(len(configs)))),
            "seed_index": tune.grid_search(list(range(plan.spec.sweep.seeds))), **shown}


def _drawn_points(plan: SweepPlan) -> list[dict]:
    """One point per drawn configuration, every shown setting fixed, so Tune samples nothing itself."""
    keys = _keys(plan.configs)
    return [{"config_index": i, **{k: _shown(c.get(k, NOT_SAMPLED)) for k in keys}} for i, c in enumerate(plan.configs)]


def _keys(configs: list[dict]) -> list[str]:
    return list(dict.fromkeys(k for c in configs for k in c))


def _shown(value):
    # the table's cells are short: learning rates at 3 significant digits (the trial uses its exact value)
    if isinstance(value, float):
        return float(f"{value:.3g}")
    return value if isinstance(value, (str, int, bool)) or value is None else str(value)


def _tune_config(plan: SweepPlan):
    s = plan.spec.sweep
    if s.scheduler.type == "asha":
        # the clock is `progress` (epochs done, fractional): rungs can fall inside an epoch, at any report
        scheduler = ASHAScheduler(time_attr="progress", max_t=plan.max_epochs,
                                  grace_period=s.scheduler.grace_period, reduction_factor=s.scheduler.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    if s.search == "optuna":
        search_alg = OptunaSearch(space=define_by_run(plan.spec, plan.is_vlm), metric=s.metric, mode=s.mode,
                                  sampler=TPESampler(seed=s.search_seed))
        return tune.TuneConfig(metric=s.metric, mode=s.mode, scheduler=scheduler, search_alg=search_alg,
                               num_samples=s.num_samples, max_concurrent_trials=s.max_concurrent_trials)
    # random: the drawn configurations, each under every seed (the grid over seed_index). This generator takes the
    # concurrency limit itself: Tune ignores max_concurrent_trials when it is given one.
    search_alg = BasicVariantGenerator(points_to_evaluate=_drawn_points(plan),
                                       max_concurrent=s.max_concurrent_trials or 0)
    return tune.TuneConfig(metric=s.metric, mode=s.mode, scheduler=scheduler, search_alg=search_alg,
                           num_samples=len(plan.configs))


# --- the ranked summary, from MLflow (the record that outlives the cluster) -----------


def summarize(uri: str, parent_run_id: str, metric: str = "eval_loss", mode: str = "min") -> dict:
    """The sweep's children ranked as `freezetune compare` ranks them (finished first, then stopped early;
    running and failed trials never ranked), as rows for the parent run and the text printed at the end."""
    cmp = collect(uri, runs=[parent_run_id], metric=metric, mode=mode)
    rows = [{"rank": t.rank, "trial_id": t.trial_id, "run_id": t.run_id, "strategy": t.strategy, "outcome": t.outcome,
             "best": t.best, "epochs": t.epochs_reached, "config_id": t.config_id,
             "params": {k: v for k, v in t.params.items() if k.startswith("strategy.") or k == "seed"}}
            for t in cmp.trials]
    return {"rows": rows, "text": render_text(cmp), "verdict": cmp.verdict}
