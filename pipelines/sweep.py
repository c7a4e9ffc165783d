"""`freezetune sweep tune_spaces/NAME.yaml`: Ray Tune over strategies and per-part learning rates.

Each trial is a Tune function that builds and fits a TorchTrainer (Train V2);
the workers' per-epoch reports reach Tune through ``TuneReportCallback`` so
ASHA can stop a trial early. MLflow is written by the Tune driver only: the
sweep is one parent run, each trial exactly one child run.

Before anything starts, every trial's config is built and checked against the
model (on the meta device), so a bad space fails in seconds.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from strategies import get_strategy, settings_used
from tune_spaces.spec import SweepSpec, define_by_run, load_spec, nest, sample_configs

from . import tracking
from .config import RunConfig, deep_merge, run_config_from_dict
from .tables import format_table

log = logging.getLogger("freezetune.sweep")

SWEEP_KEY_TAG = "freezetune.sweep_key"
TRIAL_KEY_TAG = "freezetune.trial_key"


@dataclass
class SweepPlan:
    spec: SweepSpec
    base: RunConfig
    base_dict: dict  # the base config, resolved (absolute paths), as every trial starts from it
    is_vlm: bool
    configs: list[dict[str, Any]]  # random search: the sampled overrides, drawn up front

    @property
    def num_trials(self) -> int:
        s = self.spec.sweep
        return len(self.configs) * s.seeds if s.search == "random" else s.num_samples


# --- building and checking ---------------------------------------------------------

def trial_config(plan: SweepPlan, overrides: dict[str, Any], seed_index: int = 0) -> RunConfig:
    from .analyze import apply_importance

    merged = deep_merge(plan.base_dict, nest(plan.spec.trial_overrides(overrides, seed_index)))
    cfg = run_config_from_dict(merged, where=f"{plan.spec.path or plan.spec.name} trial {overrides}")
    apply_importance(cfg)  # importance_top_k as a choice: its ranking, read once per process (cached)
    return cfg


def build_sweep_plan(path: str | Path, overrides: dict | None = None) -> SweepPlan:
    from .train import skeleton_plan, skeleton_source

    spec = load_spec(path, overrides)
    base = run_config_from_dict(spec.base, where=f"{path}: base", base_dir=Path(path).parent)
    r = spec.sweep.resources
    base.resources.num_workers, base.resources.cpus_per_worker = r.num_workers, r.cpus_per_worker
    base.resources.use_gpu, base.resources.gpus_per_worker = r.gpus_per_worker > 0, r.gpus_per_worker
    base_dict = base.to_dict()
    source = skeleton_source(base)
    is_vlm = skeleton_plan(source, base).parts.is_vlm
    configs = sample_configs(spec, is_vlm) if spec.sweep.search == "random" else []
    plan = SweepPlan(spec, base, base_dict, is_vlm, configs)
    # every trial config must load and fit the model before anything starts
    checked = set()
    for overrides in configs:
        cfg = trial_config(plan, overrides)
        key = json.dumps(cfg.strategy.to_dict(), sort_keys=True, default=str)
        if key not in checked:
            skeleton_plan(source, cfg)
            checked.add(key)
    for dim in spec.space:  # optuna: check each strategy choice once with the base settings
        if dim.key == "strategy.name" and spec.sweep.search == "optuna":
            for name in dim.values:
                skeleton_plan(source, trial_config(plan, {"strategy.name": name}))
    return plan


def used_params(cfg: RunConfig, is_vlm: bool) -> dict[str, Any]:
    """The flattened config a trial ran with, minus strategy settings that mean nothing to its strategy."""
    used = settings_used(get_strategy(cfg.strategy.name), is_vlm)
    data = cfg.to_dict()
    data["strategy"] = {k: v for k, v in data["strategy"].items() if k in used}
    return tracking.flatten(data)


def describe(plan: SweepPlan) -> str:
    s = plan.spec.sweep
    lines = [f"Sweep {plan.spec.name!r}: {plan.num_trials} trials ({s.search} search"
             + (f", {len(plan.configs)} configurations x {s.seeds} seeds" if s.search == "random" else "")
             + f"), {s.scheduler.type} on {s.metric} ({s.mode}), {s.max_concurrent_trials} at a time"]
    lines.append(format_table(["setting", "distribution"], [[d.key, d.describe()] for d in plan.spec.space],
                              title="search space (strategy.* settings are sampled only where the strategy uses them):"))
    r = s.resources
    lines.append(f"per trial: {r.num_workers} Ray Train worker(s) x {r.cpus_per_worker} CPU"
                 + (f" + {r.gpus_per_worker} GPU" if r.gpus_per_worker else "") + f", {plan.base.train.epochs} epochs"
                 + f"; model {plan.base.model} ({'VLM' if plan.is_vlm else 'text'})")
    if plan.configs:
        keys = sorted({k for c in plan.configs for k in c}, key=lambda k: (k != "strategy.name", k))
        rows = [[i] + [c.get(k) for k in keys] for i, c in enumerate(plan.configs)]
        lines.append(format_table(["#"] + keys, rows, title="configurations drawn (- = not used by that strategy):"))
    return "\n".join(lines)


# --- the trial ----------------------------------------------------------------------

def trial_settings(config: dict, configs: list[dict]) -> tuple[dict, int]:
    """(overrides, seed index) of a trial from its Tune config (random: indices; optuna: dotted keys)."""
    if "config_index" in config:
        return configs[config["config_index"]], int(config.get("seed_index", 0))
    return {k: v for k, v in config.items() if "." in k}, 0


def run_trial(config: dict, plan: SweepPlan, model_path: str, trials_storage: str) -> None:
    """One Tune trial = one TorchTrainer, named after the trial so a restarted trial finds its checkpoints."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from .trainer import make_trainer

    overrides, seed_index = trial_settings(config, plan.configs)
    cfg = trial_config(plan, overrides, seed_index)
    trial_id = ray.tune.get_context().get_trial_id()
    when, trial_dir = cfg.analysis.importance, f"{trials_storage}/{trial_id}"
    if when in ("before", "both"):
        from .analyze import trial_importance

        trial_importance(cfg, model_path, "before", trial_dir)
    result = make_trainer(cfg, model_path, trial_id, [TuneReportCallback()], trials_storage).fit()
    if when in ("after", "both") and result.checkpoint is not None:
        from .analyze import trial_importance

        trial_importance(cfg, model_path, "after", trial_dir, checkpoint=result.checkpoint.path)


# --- the sweep ----------------------------------------------------------------------

def _fresh_name(storage: str, name: str) -> str:
    from .train import _fresh_name as fresh

    return fresh(storage, name)


def run_sweep(path: str | Path, address: str | None = None, resume: bool = False, dry_run: bool = False,
              overrides: dict | None = None) -> dict:
    path = Path(path).absolute()  # ray.init inside a job may change the working directory
    plan = build_sweep_plan(path, overrides)
    print(describe(plan), flush=True)
    if dry_run:
        return {"dry_run": True, "trials": plan.num_trials}

    import ray
    from ray import tune

    from . import ray_env
    from .mlflow_callbacks import SweepMlflowCallback
    from .train import check_cluster_reach, prepare
    from .trainer import worker_resources

    spec, base = plan.spec, plan.base
    prep = prepare(base)  # tracking reachable, model resolved, data tokenised once for every trial
    uri, storage = base.tracking_uri, base.resolved_storage_path
    name = spec.name if resume else _fresh_name(storage, spec.name)
    sweep_dir = f"{storage}/{name}"
    if resume and not tune.Tuner.can_restore(sweep_dir):
        raise ValueError(f"--resume: no sweep to resume at {sweep_dir}; run without --resume to start it.")

    ray_env.connect(address)
    ray_env.leave_job_working_dir(storage)
    ray_env.check_capacity(spec.sweep.resources.num_workers, worker_resources(base.resources))
    check_cluster_reach(base, prep.model_path)

    parent = tracking.find_run(uri, base.mlflow.experiment, SWEEP_KEY_TAG, sweep_dir) if resume else None
    if parent:
        tracking.reopen_run(uri, parent)
    else:
        parent = tracking.start_run(uri, base.mlflow.experiment, name, tags={SWEEP_KEY_TAG: sweep_dir, "kind": "sweep"})
        tracking.log_params(uri, parent, {**tracking.flatten({"sweep": _settings_dict(spec)}),
                                          "model": base.model, "trials": plan.num_trials})
        tracking.log_text(uri, parent, Path(path).read_text(), f"space/{Path(path).name}")
        if overrides:
            tracking.log_dict(uri, parent, overrides, "space/overrides.json")
        tracking.log_text(uri, parent, describe(plan), "space/space.txt")

    callback = SweepMlflowCallback(uri, base.mlflow.experiment, parent, sweep_dir, plan, base.train.epochs)
    outbox = f"{sweep_dir}/mlflow_outbox.json"
    if resume and os.path.exists(outbox):
        callback.replay(outbox)
        os.remove(outbox)
    # The trial function only drives; its TorchTrainer's workers hold the real resources. It lives on the head
    # node: scattered over worker nodes, its CPU slivers would leave no node a whole CPU for a Train worker.
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, plan=plan, model_path=prep.model_path, trials_storage=f"{sweep_dir}/trials"),
        tune.PlacementGroupFactory([{"CPU": 0.05, "node:__internal_head__": 0.001}]),
    )
    status = "FAILED"
    try:
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
            writer.dump(outbox)
            raise tracking.TrackingError(
                f"the sweep finished but MLflow ({tracking.redact(uri)}) stayed unreachable: {undelivered} write(s) "
                f"are kept in {outbox}. Bring MLflow back and run `freezetune sweep {path} --resume`: it delivers "
                "them first (no trial is rerun).")
        summary = summarize(uri, parent, spec.sweep.metric, spec.sweep.mode)
        print("\n" + summary["text"], flush=True)
        tracking.log_text(uri, parent, summary["text"], "summary/ranked.txt")
        tracking.log_dict(uri, parent, summary["rows"], "summary/ranked.json")
        best = summary["rows"][0] if summary["rows"] and summary["rows"][0]["outcome"] != "failed" else None
        if best:
            tracking.set_tags(uri, parent, {"best_trial": best["trial_id"], "best_run_id": best["run_id"],
                                            f"best_{spec.sweep.metric}": best["best"]})
            tracking.log_params(uri, parent, {f"best.{k}": v for k, v in best["params"].items()})
            tracking.log_metrics(uri, parent, {f"best_{spec.sweep.metric}": best["best"]}, step=0)
        status = "FINISHED"
        return {"parent_run_id": parent, "name": name, "rows": summary["rows"], "errors": len(grid.errors),
                "tracking_uri": uri}
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracking.end_run(uri, parent, status)


def _mlflow_writer(tuner, fallback):
    """The callback instance Tune actually used (a restored Tuner carries its own unpickled copy)."""
    from .mlflow_callbacks import SweepMlflowCallback

    try:
        callbacks = tuner._local_tuner.get_run_config().callbacks or []
    except AttributeError:
        callbacks = []
    return next((c for c in callbacks if isinstance(c, SweepMlflowCallback)), fallback)


def _settings_dict(spec: SweepSpec) -> dict:
    import dataclasses

    return dataclasses.asdict(spec.sweep)


def _param_space(plan: SweepPlan) -> dict:
    from ray import tune

    if plan.spec.sweep.search == "optuna":
        return {}
    return {"config_index": tune.grid_search(list(range(len(plan.configs)))),
            "seed_index": tune.grid_search(list(range(plan.spec.sweep.seeds)))}


def _tune_config(plan: SweepPlan):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    s = plan.spec.sweep
    if s.scheduler.type == "asha":
        scheduler = ASHAScheduler(time_attr="epoch", max_t=plan.base.train.epochs,
                                  grace_period=s.scheduler.grace_period, reduction_factor=s.scheduler.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    search_alg, num_samples = None, 1
    if s.search == "optuna":
        from optuna.samplers import TPESampler
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(space=define_by_run(plan.spec, plan.is_vlm), metric=s.metric, mode=s.mode,
                                  sampler=TPESampler(seed=s.search_seed))
        num_samples = s.num_samples
    return tune.TuneConfig(metric=s.metric, mode=s.mode, scheduler=scheduler, search_alg=search_alg,
                           num_samples=num_samples, max_concurrent_trials=s.max_concurrent_trials)


# --- the ranked summary, from MLflow (the record that outlives the cluster) -----------

def summarize(uri: str, parent_run_id: str, metric: str = "eval_loss", mode: str = "min") -> dict:
    """The sweep's children ranked as `freezetune compare` ranks them (finished first, then stopped early;
    running and failed trials never ranked), as rows for the parent run and the text printed at the end."""
    from .compare import collect, render_text

    cmp = collect(uri, runs=[parent_run_id], metric=metric, mode=mode)
    rows = [{"rank": t.rank, "trial_id": t.trial_id, "run_id": t.run_id, "strategy": t.strategy, "outcome": t.outcome,
             "best": t.best, "epochs": t.epochs_reached, "config_id": t.config_id,
             "params": {k: v for k, v in t.params.items() if k.startswith("strategy.") or k == "seed"}}
            for t in cmp.trials]
    return {"rows": rows, "text": render_text(cmp), "verdict": cmp.verdict}


def _short(value):
    if value is None:
        return None
    try:
        number = float(value)
        return f"{number:.3g}" if not number.is_integer() else str(int(number))
    except ValueError:
        return str(value)
