"""`freezetune train CONFIG.yaml`: one fine-tuning run on Ray Train, logged to MLflow.

Order matters: everything cheap that can be wrong is checked first (config,
MLflow reachability, model, strategy against the model on the meta device,
data), then Ray starts and the TorchTrainer's workers run ``loop.py``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

from strategies import Plan, build_plan

from . import tracking
from .config import RunConfig
from .data import load_datasets, shard
from .trainer import make_trainer, worker_resources

log = logging.getLogger("freezetune.train")

RUN_KEY_TAG = "freezetune.run_key"  # how a resumed run finds its MLflow run


@dataclass
class Prepared:
    cfg: RunConfig
    model_path: str
    plan_summary: dict
    steps_per_epoch: int
    n_train: int
    n_eval: int


def default_run_name(cfg: RunConfig) -> str:
    digest = hashlib.sha1(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:8]
    model = Path(cfg.model).name if os.path.sep in cfg.model else cfg.model
    return f"{model}-{cfg.strategy.name}-{digest}"


def skeleton_plan(model_path: str, cfg: RunConfig) -> Plan:
    """The plan on a meta-device model: checks the strategy against the real architecture without loading weights."""
    import torch
    from transformers import AutoConfig

    from .models import _model_class

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=cfg.trust_remote_code)
    with torch.device("meta"):
        model = _model_class(config).from_config(config, trust_remote_code=cfg.trust_remote_code)
    return build_plan(model, cfg.strategy)


def skeleton_source(cfg: RunConfig) -> str:
    """A folder with the model's architecture, without heavy work: the demo base has tiny-llava's."""
    if cfg.model == "demo:base":
        from .models import materialize_preset

        return str(materialize_preset("tiny-llava", Path(cfg.resolved_cache_dir) / "models"))
    return resolve_model(cfg)


def resolve_model(cfg: RunConfig) -> str:
    """A local folder for ``cfg.model``: a preset is materialised, `demo:base` pre-trained once, a folder kept."""
    from .models import resolve_model_path

    if cfg.model.startswith("demo:"):
        from .demo import resolve_demo_uri

        return resolve_demo_uri(cfg.model)
    return resolve_model_path(cfg.model, Path(cfg.resolved_cache_dir) / "models")


def prepare(cfg: RunConfig) -> Prepared:
    """All checks and the data cache, before any Ray worker starts."""
    from .models import load_processor

    tracking.check_tracking_uri(cfg.tracking_uri)
    if cfg.trust_remote_code:
        log.warning("model `%s`: trust_remote_code=True runs Python code shipped with the model (here and on every "
                    "worker); only use it for sources you trust.", cfg.model)
    model_path = resolve_model(cfg)
    from .analyze import apply_importance

    apply_importance(cfg, model_path)  # importance_top_k: strategy.importance_from -> strategy.importance
    plan = skeleton_plan(model_path, cfg)
    processor = load_processor(model_path, trust_remote_code=cfg.trust_remote_code)
    # tokenise once here: the workers (and later trials) read the cache
    train_set, eval_set = load_datasets(cfg.data, processor, seed=cfg.seed)
    per_worker = len(shard(train_set, 0, cfg.resources.num_workers))
    if per_worker == 0:
        raise ValueError(f"data.train: {len(train_set)} examples cannot feed {cfg.resources.num_workers} workers; "
                         "add data or lower resources.num_workers.")
    steps = math.ceil(math.ceil(per_worker / cfg.train.batch_size) / cfg.train.grad_accum)
    summary = plan.summary(1, model_name=cfg.model, precision="fp32" if cfg.train.precision == "fp32" else "bf16")
    return Prepared(cfg, model_path, summary, steps, len(train_set), len(eval_set))


def check_cluster_reach(cfg: RunConfig, model_path: str) -> None:
    """Jobs must not depend on the submitting machine: on a multi-node cluster every node must see these."""
    from . import ray_env

    Path(cfg.resolved_storage_path).mkdir(parents=True, exist_ok=True)
    paths = {"storage_path": cfg.resolved_storage_path, "model": model_path if os.path.isdir(model_path) else "",
             "data.train": cfg.data.train, "data.eval": cfg.data.eval or ""}
    urls = {}
    uri = cfg.tracking_uri
    if uri.startswith("sqlite:///"):
        paths["mlflow.tracking_uri (SQLite file)"] = str(Path(uri[len("sqlite:///"):]).expanduser().absolute().parent)
    elif uri.startswith(("http://", "https://")):
        urls["mlflow.tracking_uri"] = uri.rstrip("/") + "/health"
    ray_env.check_reachable_from_all_nodes(paths, urls)


def log_run_start(prep: Prepared, run_id: str) -> None:
    """Params, tags, the plan table and the LR-schedule plot."""
    from .plan_view import render_plan
    from .plots import lr_schedule_figure

    cfg, uri, s = prep.cfg, prep.cfg.tracking_uri, prep.plan_summary
    tracking.log_params(uri, run_id, {**tracking.flatten(cfg.to_dict()), "model_path": prep.model_path,
                                      "data.n_train": prep.n_train, "data.n_eval": prep.n_eval})
    tracking.set_tags(uri, run_id, {
        "strategy": s["strategy"], "model": cfg.model, "vlm_strategy_id": s.get("letter") or "",
        "parts_trained": ",".join(p for p, v in s["parts"].items() if v["trainable"]),
        "trainable_params": s["trainable_params"], "trainable_share": f"{s['trainable_share']:.4f}",
    })
    tracking.log_text(uri, run_id, render_plan(s), "plan/plan.txt")
    tracking.log_dict(uri, run_id, s, "plan/plan.json")
    import matplotlib.pyplot as plt

    fig = lr_schedule_figure(s["param_groups"], prep.steps_per_epoch, cfg.train.epochs, cfg.train.schedule,
                             s.get("stages"), title=f"LR schedule: {s['strategy']} on {cfg.model}")
    tracking.log_figure(uri, run_id, fig, "plots/lr_schedule.png")
    plt.close(fig)


def _fresh_name(storage: str, name: str) -> str:
    """Without --resume a rerun gets its own Ray storage folder (Ray would otherwise resume the old one)."""
    candidate, n = name, 1
    while (Path(storage) / candidate).exists():
        n += 1
        candidate = f"{name}-{n}"
    return candidate


def run_training(cfg: RunConfig, address: str | None = None, resume: bool = False) -> dict:
    """Run one fine-tuning; returns {run_id, run_name, metrics, checkpoint}. The MLflow run always ends."""
    from . import ray_env
    from .mlflow_callbacks import TrainEpochLogger

    prep = prepare(cfg)
    uri = cfg.tracking_uri
    storage = cfg.resolved_storage_path
    base_name = cfg.name or default_run_name(cfg)
    run_name = base_name if resume else _fresh_name(storage, base_name)

    ray_env.connect(address)
    ray_env.leave_job_working_dir(storage)
    res = cfg.resources
    ray_env.check_capacity(res.num_workers, worker_resources(res))
    check_cluster_reach(cfg, prep.model_path)

    run_id = tracking.find_run(uri, cfg.mlflow.experiment, RUN_KEY_TAG, f"{storage}/{run_name}") if resume else None
    if run_id:
        tracking.reopen_run(uri, run_id)
        log.info("resuming MLflow run %s (%s)", run_id, run_name)
    else:
        run_id = tracking.start_run(uri, cfg.mlflow.experiment, run_name, tags={RUN_KEY_TAG: f"{storage}/{run_name}"})
    status = "FAILED"
    try:
        log_run_start(prep, run_id)
        trainer = make_trainer(cfg, prep.model_path, run_name, [TrainEpochLogger(uri, run_id)], storage)
        when, analysis_dir = cfg.analysis.importance, f"{storage}/{run_name}/importance"
        if when in ("before", "both"):
            from .analyze import trial_importance

            trial_importance(cfg, prep.model_path, "before", analysis_dir)
        log.info("training %s: %d workers, %d optimizer steps per epoch, %d epochs", run_name, res.num_workers,
                 prep.steps_per_epoch, cfg.train.epochs)
        result = trainer.fit()
        checkpoint = result.checkpoint.path if result.checkpoint else None
        if when in ("after", "both") and checkpoint:
            from .analyze import trial_importance

            trial_importance(cfg, prep.model_path, "after", analysis_dir, checkpoint=checkpoint)
        if when:
            from .analyze import log_trial_importance

            log_trial_importance(uri, run_id, analysis_dir)
        if checkpoint:
            tracking.set_tags(uri, run_id, {"checkpoint": checkpoint,
                                            "final_model": f"{checkpoint}/final_model" if cfg.train.save != "none" else ""})
        status = "FINISHED"
        return {"run_id": run_id, "run_name": run_name, "checkpoint": checkpoint,
                "metrics": tracking.client(uri).get_run(run_id).data.metrics, "tracking_uri": uri}
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except Exception as err:
        tracking.set_tags(uri, run_id, {"error": f"{type(err).__name__}: {err}"[:5000]})
        raise
    finally:
        tracking.end_run(uri, run_id, status)
